// The training call as one op (batch_norm_train_step, batch_norm_act_train_step)
// and the validation op, for every backend: validation, then the backend's
// training op, then num_batches_tracked and the running statistics, through
// the dispatcher (csrc/ops.cpp explains the schemas).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "train_step.h"

namespace bnext {

namespace {

using at::Tensor;
using std::optional;

bool has(const optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

using Step = std::tuple<Tensor, Tensor, Tensor>;

// num_batches_tracked += 1, then running = (1 - f) * running + f * batch
// with f = momentum, or 1 / num_batches_tracked (read on the device) when
// momentum is None, or 0 when neither is given: torch's _BatchNorm factor.
// An empty batch counts but leaves the statistics as they are, as in torch.
void finish_step(
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    const Tensor& save_mean,
    const Tensor& unbiased_var,
    optional<double> momentum,
    bool has_statistics) {
  if (has(num_batches_tracked)) {
    num_batches_tracked->add_(1);
  }
  if (!has(running_mean) || !has_statistics) {
    return;
  }
  optional<Tensor> count;
  if (!momentum.has_value()) {
    if (has(num_batches_tracked)) {
      count = num_batches_tracked;
    } else {
      momentum = 0.0;
    }
  }
  static auto update = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("bnext::update_running_stats", "")
                           .typed<void(
                               Tensor&, Tensor&, const Tensor&, const Tensor&,
                               optional<double>, const optional<Tensor>&)>();
  Tensor rm = *running_mean;
  Tensor rv = *running_var;
  update.call(rm, rv, save_mean, unbiased_var, momentum, count);
}

// torch's result for an input without elements, with (C,) statistics that
// are never read.
Step empty_step(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    optional<double> momentum) {
  Tensor out = empty_batch_output(input, weight, bias);
  const c10::SymInt C = input.dim() > 1 ? input.sym_size(1) : c10::SymInt(0);
  Tensor save_mean = at::zeros_symint({C}, input.options().dtype(at::kDouble));
  Tensor save_invstd =
      at::zeros_symint({C}, input.options().dtype(acc_dtype(input.scalar_type())));
  finish_step(running_mean, running_var, num_batches_tracked, save_mean, save_invstd, momentum,
              /*has_statistics=*/false);
  return {out, save_mean, save_invstd};
}

}  // namespace

Step train_step(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    optional<double> momentum,
    double eps) {
  check_batch_norm_call(
      input, weight, bias, running_mean, running_var, num_batches_tracked, true, eps);
  if (input.sym_numel() == 0) {
    return empty_step(input, weight, bias, running_mean, running_var, num_batches_tracked,
                      momentum);
  }
  static auto train = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("bnext::batch_norm_train", "")
                          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                              const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                              double)>();
  auto [out, save_mean, save_invstd, unbiased_var] = train.call(input, weight, bias, eps);
  finish_step(running_mean, running_var, num_batches_tracked, save_mean, unbiased_var, momentum,
              /*has_statistics=*/true);
  return {out, save_mean, save_invstd};
}

Step act_train_step(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    optional<double> momentum,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving) {
  check_batch_norm_call(
      input, weight, bias, running_mean, running_var, num_batches_tracked, true, eps);
  check_residual(input, residual);
  if (input.sym_numel() == 0) {
    return empty_step(input, weight, bias, running_mean, running_var, num_batches_tracked,
                      momentum);
  }
  // The backend op checks the activation and memory_saving's needs (a zero
  // weight on the CPU) before this op mutates anything.
  static auto train = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("bnext::batch_norm_act_train", "")
                          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                              const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                              const optional<Tensor>&, double, c10::string_view, double, bool)>();
  auto [out, save_mean, save_invstd, unbiased_var] = train.call(
      input, weight, bias, residual, eps, activation, negative_slope, memory_saving);
  finish_step(running_mean, running_var, num_batches_tracked, save_mean, unbiased_var, momentum,
              /*has_statistics=*/true);
  return {out, save_mean, save_invstd};
}

namespace {

Tensor batch_norm_train_step(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    optional<double> momentum,
    double eps) {
  return std::get<0>(train_step(
      input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps));
}

Tensor batch_norm_act_train_step(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    optional<double> momentum,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving) {
  return std::get<0>(act_train_step(
      input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
      eps, activation, negative_slope, memory_saving));
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_train_step", &batch_norm_train_step);
  m.impl("batch_norm_act_train_step", &batch_norm_act_train_step);
  m.impl("check_batch_norm_call", &check_batch_norm_call);  // checks.h
}

}  // namespace bnext
