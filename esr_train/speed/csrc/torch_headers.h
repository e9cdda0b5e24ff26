// The parts of torch the kernels use: tensors, at::parallel_for, the two factories, and the
// pybind11 casters for at::Tensor. torch/extension.h includes the whole C++ frontend (autograd,
// nn, optim, serialization): its headers alone took 21 s of each kernel's 25 s build on a 2-core
// Intel, so the four kernels took 102 s on first use (docs/performance.md P26).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
