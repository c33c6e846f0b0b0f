// The CPU ops as one table of function pointers.
//
// The CPU kernels are compiled once per instruction-set level (default,
// avx2, avx512, avx512_bf16), each level into a library of its own,
// bnext/_cpu_<level>.so, which exports bnext_cpu_op_table(). bnext._C, built
// for the baseline instruction set, registers the CPU kernels once and calls
// through the table of the level chosen at import (csrc/cpu_dispatch.cpp,
// bnext/_cpu_capability.py), as ATen's DispatchStub does for torch's own
// kernels: one build then runs on every x86-64 CPU, at its best level.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace bnext::cpu {

// Changed whenever the table's layout or an op's signature changes, so that
// a level library from another build is refused instead of miscalled.
constexpr int kOpTableVersion = 4;

using at::Tensor;
using std::optional;

struct OpTable {
  int version;
  const char* level;  // "default", "avx2", "avx512" or "avx512_bf16"

  // The ops of csrc/ops.cpp, with the signatures their schemas give.
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*batch_norm_train)(
      const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
      double eps);
  Tensor (*batch_norm_eval)(
      const Tensor& input, const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var,
      const optional<Tensor>& weight, const optional<Tensor>& bias, double eps);
  void (*update_running_stats)(
      Tensor& running_mean, Tensor& running_var, const Tensor& save_mean,
      const Tensor& unbiased_var, optional<double> momentum,
      const optional<Tensor>& num_batches_tracked);
  std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>> (*batch_norm_backward)(
      const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
      const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
      const optional<Tensor>& save_mean, const optional<Tensor>& save_invstd, bool train,
      double eps, std::array<bool, 3> output_mask);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*batch_norm_act_train)(
      const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
      const optional<Tensor>& residual, double eps, c10::string_view activation,
      double negative_slope, bool memory_saving);
  Tensor (*batch_norm_act_eval)(
      const Tensor& input, const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var,
      const optional<Tensor>& weight, const optional<Tensor>& bias,
      const optional<Tensor>& residual, double eps, c10::string_view activation,
      double negative_slope, bool memory_saving);
  std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>, optional<Tensor>> (
      *batch_norm_act_backward)(
      const Tensor& grad_output, const Tensor& saved, bool saved_is_output,
      const optional<Tensor>& weight, const optional<Tensor>& bias,
      const optional<Tensor>& residual, const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var, const optional<Tensor>& save_mean,
      const optional<Tensor>& save_invstd, bool train, double eps,
      c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask);

  // The phase ops (SyncBatchNorm's steps).
  Tensor (*batch_norm_moments)(const Tensor& input);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*batch_norm_merge_moments)(
      const Tensor& moments, double eps);
  Tensor (*batch_norm_elemt)(
      const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
      const Tensor& mean, const Tensor& invstd, const optional<Tensor>& residual,
      c10::string_view activation, double negative_slope);
  std::tuple<Tensor, optional<Tensor>, optional<Tensor>, optional<Tensor>> (
      *batch_norm_backward_reduce)(
      const Tensor& grad_output, const Tensor& input, const Tensor& mean,
      const Tensor& invstd, const optional<Tensor>& weight, const optional<Tensor>& bias,
      const optional<Tensor>& residual, c10::string_view activation, double negative_slope,
      std::array<bool, 3> output_mask);
  Tensor (*batch_norm_backward_elemt)(
      const Tensor& grad_output, const Tensor& input, const Tensor& mean,
      const Tensor& invstd, const optional<Tensor>& weight, const optional<Tensor>& bias,
      const optional<Tensor>& residual, const optional<Tensor>& grad_residual,
      const Tensor& sums, const Tensor& count, c10::string_view activation,
      double negative_slope);

  // The level library's forced memory-traffic choices (cache_policy.h's
  // Tuning: 0 streaming stores, 1 resident walk; -1 automatic, 0 off, 1 on).
  int (*forced_choice)(int which);
  void (*set_forced_choice)(int which, int value);
};

// Each level library's part of the table: ops_cpu.cpp fills the plain ops,
// ops_fused_cpu.cpp the fused ones, ops_phase_cpu.cpp the phase ops.
void fill_plain_ops(OpTable& table);
void fill_fused_ops(OpTable& table);
void fill_phase_ops(OpTable& table);

}  // namespace bnext::cpu

// Exported by every level library (op_table.cpp).
extern "C" const bnext::cpu::OpTable* bnext_cpu_op_table();
