/* A stand-in for x86 CPUs that are not here: what CPUID tells this process loses the instruction sets
 * the chosen profile lacks, so that onnxruntime (and numpy) pick the kernels they pick on such a CPU,
 * and run them natively. The kernels themselves are the real ones: an AVX2 kernel's int16 saturation
 * (vpmaddubsw) is the same on every CPU that runs it.
 *
 *   CPUID_PROFILE=avx2    AMD Zen 3, Intel Haswell to Comet Lake: AVX2 and FMA, no AVX-512, no VNNI
 *   CPUID_PROFILE=avx512  Intel Skylake-SP: AVX-512 F/CD/BW/DQ/VL, no VNNI, no BF16, no AMX
 *   CPUID_PROFILE=vnni    AMD Zen 4, Intel Ice Lake-SP: AVX-512 with VNNI and BF16, no AMX, no FP16,
 *                         no AVX-VNNI (an AMX machine's stand-in for the VNNI kernels)
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID 0, where the CPU or the hypervisor offers it)
 * makes every CPUID instruction of this process raise SIGSEGV; the handler runs the real CPUID and
 * clears the profile's bits. A SIGSEGV handler installed later (Python's faulthandler) is chained,
 * not put in our place. The setting is dropped at execve: LD_PRELOAD sets it again in each child.
 * /proc/cpuinfo, opened by name, reads without the flags the profile lacks, so what the kernel says
 * and what CPUID says agree.
 *
 * Test-only. Built by tests/cpus/__init__.py; a process that cannot mask (no CPUID faulting) exits
 * with status 97 before main, so a test never runs on the real CPU believing it runs on another. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))
/* CPUID leaf 7 subleaf 0 (EBX, ECX, EDX) and subleaf 1 (EAX, EDX) bits, as the Intel SDM names them. */
#define AVX512_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31)) /* F DQ IFMA PF ER CD BW VL */
#define AVX512_ECX (BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14)) /* VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
#define AVX512_EDX (BIT(2) | BIT(3) | BIT(8) | BIT(23))            /* 4VNNIW 4FMAPS VP2INTERSECT FP16 */
#define AMX_EDX (BIT(22) | BIT(24) | BIT(25))                     /* AMX-BF16 AMX-TILE AMX-INT8 */
#define VNNI_ECX BIT(11)                                           /* AVX512_VNNI */
#define SUB1_EAX (BIT(4) | BIT(5))                                 /* AVX-VNNI, AVX512_BF16 */
#define SUB1_EDX (BIT(4) | BIT(5))                                 /* AVX-VNNI-INT8, AVX-NE-CONVERT */
#define SKYLAKE_EBX (BIT(16) | BIT(17) | BIT(28) | BIT(30) | BIT(31)) /* what Skylake-SP keeps: F DQ CD BW VL */

static unsigned clear7_ebx, clear7_ecx, clear7_edx, clear71_eax, clear71_edx;
static const char *const *hidden_flags; /* /proc/cpuinfo flags the profile lacks (prefixes end in '*') */
static const char *const AVX2_HIDDEN[] = {"avx512*", "avx_vnni*", "amx*", "avx_ne_convert", NULL};
static const char *const AVX512_HIDDEN[] = {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512ifma", "avx512vbmi",
                                            "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "avx512_vp2intersect",
                                            "avx_vnni*", "amx*", "avx_ne_convert", NULL};
static const char *const VNNI_HIDDEN[] = {"avx512_fp16", "avx512_vp2intersect", "avx_vnni*", "amx*", "avx_ne_convert",
                                          NULL};
static struct sigaction chained; /* the SIGSEGV handler the program asked for */
static int masking;
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    /* A faulting CPUID is a general protection fault (SI_KERNEL); a bad address is not, and its
     * instruction pointer may not be readable. */
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        __cpuid_count(leaf, sub, a, b, c, d);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        if (leaf == 7 && sub == 0) {
            b &= ~clear7_ebx;
            c &= ~clear7_ecx;
            d &= ~clear7_edx;
        } else if (leaf == 7 && sub == 1) {
            a &= ~clear71_eax;
            d &= ~clear71_edx;
        }
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else { /* the default: the fault happens again on return, and kills the process as it would have */
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL);
    }
}

static int hidden(const char *flag, size_t length) {
    for (const char *const *h = hidden_flags; h && *h; h++) {
        size_t n = strlen(*h);
        if ((*h)[n - 1] == '*' ? length >= n - 1 && !strncmp(flag, *h, n - 1) : length == n && !strncmp(flag, *h, n))
            return 1;
    }
    return 0;
}

/* /proc/cpuinfo without the hidden flags, as an unlinked in-memory file; -1 if that cannot be made. */
static int filtered_cpuinfo(int (*real_open)(const char *, int, ...)) {
    static char text[1 << 20], out[1 << 20];
    int fd = real_open("/proc/cpuinfo", O_RDONLY), memory;
    if (fd < 0)
        return -1;
    size_t size = 0;
    ssize_t got;
    while (size < sizeof text - 1 && (got = read(fd, text + size, sizeof text - 1 - size)) > 0)
        size += (size_t)got;
    close(fd);
    text[size] = 0;
    size_t o = 0;
    for (char *line = text; *line;) {
        char *end = strchr(line, '\n');
        size_t length = end ? (size_t)(end - line + 1) : strlen(line);
        if (!strncmp(line, "flags", 5)) { /* "flags\t\t: a b c": copy the words the profile keeps */
            char *colon = memchr(line, ':', length);
            size_t head = colon ? (size_t)(colon - line + 1) : length;
            memcpy(out + o, line, head);
            o += head;
            for (char *word = line + head; word < line + length;) {
                while (word < line + length && (*word == ' ' || *word == '\n'))
                    word++;
                char *stop = word;
                while (stop < line + length && *stop != ' ' && *stop != '\n')
                    stop++;
                if (stop > word && !hidden(word, (size_t)(stop - word))) {
                    out[o++] = ' ';
                    memcpy(out + o, word, (size_t)(stop - word));
                    o += (size_t)(stop - word);
                }
                word = stop;
            }
            out[o++] = '\n';
        } else {
            memcpy(out + o, line, length);
            o += length;
        }
        line += length;
    }
    memory = memfd_create("cpuinfo", 0);
    if (memory < 0 || write(memory, out, o) != (ssize_t)o || lseek(memory, 0, SEEK_SET) != 0)
        return -1;
    return memory;
}

#define OPEN_WRAPPER(name, ...)                                                        \
    int name(__VA_ARGS__, int flags, ...) {                                           \
        static int (*real)(const char *, int, ...);                                   \
        va_list args;                                                                 \
        va_start(args, flags);                                                        \
        mode_t mode = (mode_t)va_arg(args, int);                                      \
        va_end(args);                                                                 \
        if (!real)                                                                    \
            real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");        \
        if (masking && hidden_flags && !strcmp(path, "/proc/cpuinfo")) {              \
            int fd = filtered_cpuinfo(real);                                          \
            if (fd >= 0)                                                              \
                return fd;                                                            \
        }                                                                             \
        return CALL_REAL(name);                                                       \
    }

static int (*resolve(const char *symbol))(void) { return (int (*)(void))dlsym(RTLD_NEXT, symbol); }
#define CALL_REAL(name) ((int (*)(const char *, int, mode_t))resolve(#name))(path, flags, mode)
OPEN_WRAPPER(open, const char *path)
OPEN_WRAPPER(open64, const char *path)
#undef CALL_REAL
#define CALL_REAL(name) ((int (*)(int, const char *, int, mode_t))resolve(#name))(dirfd, path, flags, mode)
OPEN_WRAPPER(openat, int dirfd, const char *path)
OPEN_WRAPPER(openat64, int dirfd, const char *path)
#undef CALL_REAL

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !masking)
        return real_sigaction(sig, act, old);
    if (old)
        *old = chained;
    if (act)
        chained = *act;
    return 0;
}

__attribute__((constructor)) static void start_masking(void) {
    real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    const char *profile = getenv("CPUID_PROFILE");
    if (!profile || !*profile)
        return;
    if (!strcmp(profile, "avx2")) {
        clear7_ebx = AVX512_EBX;
        clear7_ecx = AVX512_ECX;
        clear7_edx = AVX512_EDX | AMX_EDX;
        clear71_eax = SUB1_EAX;
        clear71_edx = SUB1_EDX;
        hidden_flags = AVX2_HIDDEN;
    } else if (!strcmp(profile, "avx512")) {
        clear7_ebx = AVX512_EBX & ~SKYLAKE_EBX;
        clear7_ecx = AVX512_ECX;
        clear7_edx = AVX512_EDX | AMX_EDX;
        clear71_eax = SUB1_EAX;
        clear71_edx = SUB1_EDX;
        hidden_flags = AVX512_HIDDEN;
    } else if (!strcmp(profile, "vnni")) {
        clear7_edx = AVX512_EDX | AMX_EDX; /* 4VNNIW 4FMAPS VP2INTERSECT FP16, AMX */
        clear71_eax = BIT(4); /* AVX-VNNI; AVX512_BF16 kept */
        clear71_edx = SUB1_EDX;
        hidden_flags = VNNI_HIDDEN;
    } else {
        fprintf(stderr, "cpuid_mask: unknown CPUID_PROFILE %s (avx2, avx512, vnni)\n", profile);
        _exit(97);
    }
    struct sigaction handler;
    memset(&handler, 0, sizeof handler);
    handler.sa_sigaction = on_segv;
    handler.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&handler.sa_mask);
    real_sigaction(SIGSEGV, &handler, &chained);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "cpuid_mask: this machine has no CPUID faulting: cannot stand in for another CPU\n");
        _exit(97);
    }
    masking = 1;
}
