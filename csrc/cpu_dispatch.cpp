// bnext._C's CPU kernels: registered once, each a call through the op table
// of the CPU capability level loaded at import (csrc/cpu/op_table.h;
// bnext/_cpu_capability.py chooses the level and calls load_cpu_op_table).
// This file is compiled for the baseline instruction set, like the rest of
// _C: only the level libraries hold vector code.
#include <dlfcn.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <string>

#include "cpu/op_table.h"
#include "cpu_dispatch.h"

namespace bnext::cpu {

namespace {

std::atomic<const OpTable*> current_table{nullptr};

const OpTable& table() {
  const OpTable* t = current_table.load(std::memory_order_acquire);
  TORCH_CHECK(
      t != nullptr,
      "bnext: no CPU kernels are loaded; `import bnext` loads those of this CPU's level");
  return *t;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_train(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    double eps) {
  return table().batch_norm_train(input, weight, bias, eps);
}

Tensor batch_norm_eval(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  return table().batch_norm_eval(input, running_mean, running_var, weight, bias, eps);
}

void update_running_stats(
    Tensor& running_mean, Tensor& running_var, const Tensor& save_mean,
    const Tensor& unbiased_var, optional<double> momentum,
    const optional<Tensor>& num_batches_tracked) {
  table().update_running_stats(
      running_mean, running_var, save_mean, unbiased_var, momentum, num_batches_tracked);
}

std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>> batch_norm_backward(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& save_mean, const optional<Tensor>& save_invstd, bool train,
    double eps, std::array<bool, 3> output_mask) {
  return table().batch_norm_backward(
      grad_output, input, weight, running_mean, running_var, save_mean, save_invstd, train,
      eps, output_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_train(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& residual, double eps, c10::string_view activation,
    double negative_slope, bool memory_saving) {
  return table().batch_norm_act_train(
      input, weight, bias, residual, eps, activation, negative_slope, memory_saving);
}

Tensor batch_norm_act_eval(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& residual, double eps, c10::string_view activation,
    double negative_slope, bool memory_saving) {
  return table().batch_norm_act_eval(
      input, running_mean, running_var, weight, bias, residual, eps, activation,
      negative_slope, memory_saving);
}

std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>, optional<Tensor>>
batch_norm_act_backward(
    const Tensor& grad_output, const Tensor& saved, bool saved_is_output,
    const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& residual, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& save_mean,
    const optional<Tensor>& save_invstd, bool train, double eps, c10::string_view activation,
    double negative_slope, std::array<bool, 4> output_mask) {
  return table().batch_norm_act_backward(
      grad_output, saved, saved_is_output, weight, bias, residual, running_mean, running_var,
      save_mean, save_invstd, train, eps, activation, negative_slope, output_mask);
}

}  // namespace

std::string load_cpu_op_table(const std::string& path) {
  // Never closed: the table and its functions must outlive every call.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "bnext: cannot load the CPU kernels ", path, ": ", dlerror());
  using Getter = const OpTable* (*)();
  const auto getter = reinterpret_cast<Getter>(dlsym(handle, "bnext_cpu_op_table"));
  TORCH_CHECK(getter != nullptr, "bnext: ", path, " has no bnext_cpu_op_table");
  const OpTable* t = getter();
  TORCH_CHECK(
      t != nullptr && t->version == kOpTableVersion, "bnext: ", path,
      " is from another bnext build (op table version ", t != nullptr ? t->version : -1,
      ", expected ", kOpTableVersion, "); rebuild bnext");
  current_table.store(t, std::memory_order_release);
  return t->level;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  // CPUID leaf 7, sub-leaf 1, EAX bit 5; the OS's AVX-512 state support is
  // torch's part of the decision (it reports AVX512 only where it is on).
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) == 0) {
    return false;
  }
  return (eax & (1u << 5)) != 0;
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_act_train", &batch_norm_act_train);
  m.impl("batch_norm_act_eval", &batch_norm_act_eval);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward);
}

}  // namespace bnext::cpu
