#!/usr/bin/env bash
# The ARM64 job (make test-arm64): the engine's tests on an emulated aarch64 CPU, as the robots this
# CPU path is for run it (the AX650N's own Cortex-A55 host cores, a Raspberry Pi 5's A76): onnxruntime's
# aarch64 kernels (MatMulNBits, the int8 GEMM, GroupQueryAttention), the per-layer and axmodel-contract
# paths, the CLI, preprocessing, the tokenizer, the toy model through each format, and the board
# stand-in with every vendored pyaxengine version.
#
# How: a Debian bookworm arm64 root (debootstrap), run under qemu-user-static through binfmt_misc in a
# chroot of its own mount namespace; its venv is filled from PyPI's aarch64 wheels by this machine's
# pip (pip inside the emulator takes ~15 min); the board stand-in is cross-compiled. The root and venv
# are cached in build/arm64 (a second run takes minutes); a change of requirements refills the venv.
#
# QEMU_CPU picks the core (default cortex-a76, the nearest to the A55 that qemu 7.2 has: both have the
# dot-product instructions). onnxruntime reads the core from /proc/cpuinfo, which under qemu-user is
# the host's x86 file, so an Arm one for that core is bind-mounted over it: a core with features the
# emulated one lacks would run instructions qemu refuses (the int8 GEMM dies on an illegal instruction).
#
# Needs an x86-64 Linux machine, root (chroot, mounts, binfmt_misc) and Debian's qemu-user-static,
# debootstrap and gcc-aarch64-linux-gnu (installed with apt-get where missing). Where something is
# not there it prints "make test-arm64: SKIPPED: <why>" and exits 0, as the board job does.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$(pwd)
BUILD=$ROOT_DIR/build/arm64
ARM_ROOT=$BUILD/root
QEMU_CPU=${QEMU_CPU:-cortex-a76}
HOST_PYTHON=${HOST_PYTHON:-$ROOT_DIR/.venv/bin/python}  # its pip fills the root's venv
TESTS=(tests/test_config.py tests/test_engine.py tests/test_contract.py tests/test_quantized.py
       tests/test_preprocess.py tests/test_cli.py tests/test_tokenizer.py tests/test_toy.py tests/test_cpus.py
       tests/test_board.py tests/test_grounding.py)
# PyPI's aarch64 wheels for the engine and the tests (torch: PyPI's aarch64 build is CUDA's, so the
# tests that compare with transformers skip there, saying so).
WHEELS=(-r requirements/engine.txt -r requirements/arm64-test.txt)

skip() { echo "make test-arm64: SKIPPED: $*"; exit 0; }

[ "$(uname -s)" = Linux ] || skip "the ARM64 job runs on Linux, this is $(uname -s)"
case "$(uname -m)" in
  x86_64) ;;
  aarch64|arm64) skip "this machine is $(uname -m): the main suite ran on ARM64 natively" ;;
  *) skip "the ARM64 job emulates aarch64 on x86-64, this is $(uname -m)" ;;
esac
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, mounts and binfmt_misc); run make test-arm64 as root"
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || skip "no ${missing[*]} and no apt-get to install them"
  echo "installing ${missing[*]} (Debian's packages)"
  mkdir -p "$(dirname "$BUILD")"  # a fresh clone has no build/ yet: the log's redirect would fail
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$BUILD.apt.log" 2>&1 \
    || { apt-get update -q >>"$BUILD.apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$BUILD.apt.log" 2>&1; } \
    || skip "could not install ${missing[*]} (apt-get: see $BUILD.apt.log)"
fi

# binfmt_misc: the kernel hands aarch64 programs to qemu (the F flag opens qemu now, so the chroot
# needs no copy of it).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || skip "cannot mount binfmt_misc here (a container without it?)"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -f "$conf" ] || skip "no $conf from qemu-user-static"
  cat "$conf" > /proc/sys/fs/binfmt_misc/register || skip "cannot register qemu-aarch64 with binfmt_misc"
fi
# Registered without the F flag (systemd-binfmt's way), the kernel looks for qemu inside the chroot.
interpreter=$(sed -n 's/^interpreter //p' /proc/sys/fs/binfmt_misc/qemu-aarch64)

# python3-dev: the headers the board stand-in is compiled against; binutils: ld, with which ctypes
# finds the stand-in's libraries on LD_LIBRARY_PATH as pyaxengine looks for them (a board has them in
# ldconfig's cache).
PACKAGES=python3,python3-dev,binutils
mkdir -p "$BUILD"
if [ ! -f "$BUILD/root.$PACKAGES" ]; then
  rm -rf "$ARM_ROOT" "$BUILD"/root.* "$BUILD"/venv.*
  echo "debootstrap: a Debian bookworm arm64 root with $PACKAGES (a few minutes, once)"
  started=$SECONDS
  debootstrap --arch=arm64 --variant=minbase --include=$PACKAGES bookworm "$ARM_ROOT" \
      http://deb.debian.org/debian >"$BUILD/debootstrap.log" 2>&1 \
    || skip "debootstrap failed (no Debian mirror reachable?): see $BUILD/debootstrap.log"
  echo "debootstrap: $((SECONDS - started)) s"
  touch "$BUILD/root.$PACKAGES"
fi

in_root() {  # run a shell command inside the root, as $QEMU_CPU, with the checkout at /work
  unshare --mount --propagation private bash -s -- "$@" <<'SCRIPT'
set -e
root=$ARM_ROOT
mount --bind "$ROOT_DIR" "$root/work"
[ -d "$ROOT_DIR/../shared" ] && mkdir -p "$root/shared" && mount --bind -o ro "$ROOT_DIR/../shared" "$root/shared"
mount -t proc proc "$root/proc"
mount --bind "$BUILD/cpuinfo" "$root/proc/cpuinfo"
mount --bind /sys "$root/sys"
mount --bind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
cd "$root"
exec env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" \
  "$(command -v chroot)" "$root" /bin/sh -c "cd /work && $1"
SCRIPT
}
export ARM_ROOT ROOT_DIR BUILD QEMU_CPU
mkdir -p "$ARM_ROOT/work" "$ARM_ROOT/shared" "$ARM_ROOT$(dirname "$interpreter")"
cp -L "$interpreter" "$ARM_ROOT$interpreter"
"$HOST_PYTHON" scripts/arm64_root.py cpuinfo "$QEMU_CPU" "$(nproc)" > "$BUILD/cpuinfo"

# The venv: aarch64 wheels by this machine's pip, the checkout by a .pth file (so it runs as it is),
# the console scripts as setup.py names them.
stamp=$(cat requirements/engine.txt requirements/arm64-test.txt | sha256sum | cut -c1-16)
if [ ! -f "$BUILD/venv.$stamp" ]; then
  rm -rf "$ARM_ROOT/opt/venv" "$BUILD"/venv.*
  in_root "python3 -m venv --without-pip /opt/venv"
  started=$SECONDS
  "$HOST_PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --platform manylinux_2_28_aarch64 \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp \
      --only-binary :all: --target "$ARM_ROOT/opt/venv/lib/python3.11/site-packages" "${WHEELS[@]}"
  echo "aarch64 wheels: $((SECONDS - started)) s"
  touch "$BUILD/venv.$stamp"
fi
"$HOST_PYTHON" scripts/arm64_root.py venv "$ARM_ROOT" /work

# The board stand-in, cross-compiled against the root's Python headers.
mkdir -p "$ARM_ROOT/opt/axstandin"
aarch64-linux-gnu-gcc -O2 -shared -fPIC -Wall -Werror -I"$ARM_ROOT/usr/include/python3.11" -I"$ARM_ROOT/usr/include" \
  -Wl,-soname,libaxstandin.so -o "$ARM_ROOT/opt/axstandin/libaxstandin.so" tests/axboard/standin.c

echo "ARM64 job: ${TESTS[*]} on an emulated $QEMU_CPU"
started=$SECONDS
in_root "AXSTANDIN_LIB=/opt/axstandin/libaxstandin.so python -m pytest -p no:cacheprovider ${TESTS[*]}$(printf ' %q' "$@")"
echo "ARM64 job: $((SECONDS - started)) s"
