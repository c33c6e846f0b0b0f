// Autograd kernels of the plain forward ops and of the two training-step
// ops, for every backend.
//
// Why C++: a torch.library.register_autograd formula runs Python at every
// call, which costs many times the op itself on small layers. These nodes do what the Python
// formulas in bnext/_ops/batch_norm.py did:
//  - batch_norm_train: only `output` is differentiable; saves input, weight,
//    bias, save_mean, save_invstd.
//  - batch_norm_eval: the running statistics get no gradient (as torch).
//  - backward: bnext::batch_norm_backward below autograd, or through its
//    own autograd formula when the graph is being recorded (create_graph):
//    that formula (Python, closed-form VJP) gives double backward.
//  - batch_norm_train_step / batch_norm_act_train_step: the training call
//    with its buffer updates; the buffers get no gradient, and, as in
//    torch's batch norm, running statistics that require grad are refused.
//  - inputs without elements: zero gradients (torch's, whose result for
//    such inputs is input * weight[0] + bias[0]).
// While a torch.func transform is active, bnext/_ops/batch_norm.py routes calls
// through new-style Python autograd.Functions instead (tested there; these
// nodes are not tested under transforms).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "train_step.h"

namespace bnext {

namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Grads = std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>>;

optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

Tensor value(const optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

// needs_input_grad counts only the Tensor inputs that were given: a None
// weight shifts the bias's index down by one.
std::array<bool, 3> output_mask(AutogradContext* ctx, size_t first_param, bool has_weight, bool has_bias) {
  return {ctx->needs_input_grad(0),
          has_weight && ctx->needs_input_grad(first_param),
          has_bias && ctx->needs_input_grad(first_param + (has_weight ? 1 : 0))};
}

Grads call_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    const Tensor& running_mean,
    const Tensor& running_var,
    const Tensor& save_mean,
    const Tensor& save_invstd,
    bool train,
    double eps,
    std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnext::batch_norm_backward", "")
                       .typed<Grads(
                           const Tensor&, const Tensor&, const optional<Tensor>&,
                           const optional<Tensor>&, const optional<Tensor>&,
                           const optional<Tensor>&, const optional<Tensor>&, bool, double,
                           std::array<bool, 3>)>();
  auto call = [&] {
    return op.call(
        grad_output, input, maybe(weight), maybe(running_mean), maybe(running_var),
        maybe(save_mean), maybe(save_invstd), train, eps, mask);
  };
  if (at::GradMode::is_enabled()) {
    return call();  // create_graph: record the double-backward node
  }
  // Skip the op's Python autograd formula: nothing is being recorded.
  at::AutoDispatchBelowADInplaceOrView guard;
  return call();
}

// grad_bias comes back in the weight's dtype (or the statistics dtype when
// there is no weight); a bias-only call may hold the bias in another dtype.
Tensor cast_like(const optional<Tensor>& grad, const Tensor& param) {
  Tensor g = value(grad);
  if (!g.defined() || !param.defined() || g.scalar_type() == param.scalar_type()) {
    return g;
  }
  return g.to(param.scalar_type());
}

// torch's error for differentiable running statistics (RuntimeError), checked
// where torch checks it: when autograd would record the call. Called before
// Function::apply, which runs forward with grad mode off.
void check_statistics_not_differentiable(
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const char* op_name) {
  if (!at::GradMode::is_enabled()) {
    return;
  }
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"},
                                std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(
        !t->has_value() || !(*t)->defined() || !(*t)->requires_grad(), "The function '",
        op_name, "' is not differentiable with respect to argument '", name,
        "'. This input cannot have requires_grad True.");
  }
}

// Gradients of a call on an input without elements: torch's output there is
// input * weight[0] + bias[0], whose gradients are zeros.
Grads empty_input_grads(
    const Tensor& input, const Tensor& weight, const Tensor& bias, std::array<bool, 3> mask) {
  return {mask[0] ? optional<Tensor>(at::zeros_like(input)) : std::nullopt,
          mask[1] && weight.defined() ? optional<Tensor>(at::zeros_like(weight)) : std::nullopt,
          mask[2] && bias.defined() ? optional<Tensor>(at::zeros_like(bias)) : std::nullopt};
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      const optional<Tensor>& weight,
      const optional<Tensor>& bias,
      double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnext::batch_norm_train", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                             double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd, unbiased_var] = op.call(input, weight, bias, eps);
    ctx->mark_non_differentiable({save_mean, save_invstd, unbiased_var});
    // The statistics get no gradient, and backward handles an undefined
    // grad_output: no zero tensors for the engine to allocate and fill.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, value(weight), value(bias), save_mean, save_invstd});
    ctx->saved_data["eps"] = eps;
    return {out, save_mean, save_invstd, unbiased_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) {
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const variable_list saved = ctx->get_saved_variables();
    auto [gi, gw, gb] = call_backward(
        grad_output, saved[0], saved[1], Tensor(), Tensor(), saved[3], saved[4],
        /*train=*/true, ctx->saved_data["eps"].toDouble(),
        output_mask(ctx, 1, saved[1].defined(), saved[2].defined()));
    return {value(gi), value(gw), cast_like(gb, saved[2]), Tensor()};
  }
};

class EvalFunction : public torch::autograd::Function<EvalFunction> {
 public:
  static Tensor forward(
      AutogradContext* ctx,
      const Tensor& input,
      const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var,
      const optional<Tensor>& weight,
      const optional<Tensor>& bias,
      double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnext::batch_norm_eval", "")
                         .typed<Tensor(
                             const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                             const optional<Tensor>&, const optional<Tensor>&, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(input, running_mean, running_var, weight, bias, eps);
    ctx->save_for_backward(
        {input, value(running_mean), value(running_var), value(weight), value(bias)});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) {
      return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const variable_list saved = ctx->get_saved_variables();
    const auto mask = output_mask(ctx, 3, saved[3].defined(), saved[4].defined());
    auto [gi, gw, gb] = saved[0].sym_numel() == 0
        ? empty_input_grads(saved[0], saved[3], saved[4], mask)
        : call_backward(
              grad_output, saved[0], saved[3], saved[1], saved[2], Tensor(), Tensor(),
              /*train=*/false, ctx->saved_data["eps"].toDouble(), mask);
    // Like torch's batch norm, the running statistics get no gradient.
    return {value(gi), Tensor(), Tensor(), value(gw), cast_like(gb, saved[4]), Tensor()};
  }
};


class TrainStepFunction : public torch::autograd::Function<TrainStepFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      const optional<Tensor>& weight,
      const optional<Tensor>& bias,
      const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var,
      const optional<Tensor>& num_batches_tracked,
      optional<double> momentum,
      double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd] = train_step(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, value(weight), value(bias), save_mean, save_invstd});
    ctx->saved_data["eps"] = eps;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(8);
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) {
      return none;
    }
    const variable_list saved = ctx->get_saved_variables();
    const auto mask = output_mask(ctx, 1, saved[1].defined(), saved[2].defined());
    auto [gi, gw, gb] = saved[0].sym_numel() == 0
        ? empty_input_grads(saved[0], saved[1], saved[2], mask)
        : call_backward(
              grad_output, saved[0], saved[1], Tensor(), Tensor(), saved[3], saved[4],
              /*train=*/true, ctx->saved_data["eps"].toDouble(), mask);
    none[0] = value(gi);
    none[1] = value(gw);
    none[2] = cast_like(gb, saved[2]);
    return none;
  }
};

class ActTrainStepFunction : public torch::autograd::Function<ActTrainStepFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
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
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd] = act_train_step(
        input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
        eps, activation, negative_slope, memory_saving);
    ctx->set_materialize_grads(false);
    // memory_saving keeps the output instead of the input (the point of it).
    ctx->save_for_backward({memory_saving ? out : input, value(weight), value(bias),
                            value(residual), save_mean, save_invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation.data(), activation.size());
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["memory_saving"] = memory_saving;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(12);
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) {
      return none;
    }
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& s = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& bias = saved[2];
    const Tensor& residual = saved[3];
    // needs_input_grad counts only the Tensor inputs that were given.
    size_t index = 1;
    const bool need_w = weight.defined() && ctx->needs_input_grad(index++);
    const bool need_b = bias.defined() && ctx->needs_input_grad(index++);
    const bool need_r = residual.defined() && ctx->needs_input_grad(index++);
    const bool need_x = ctx->needs_input_grad(0);
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(at::GradMode::is_enabled() && (grad_output.requires_grad() || s.requires_grad())),
        "bnext: double backward through the fused BatchNormAct ops is not implemented; use "
        "bnext.BatchNorm*d followed by the activation");
    if (s.sym_numel() == 0) {
      auto [gi, gw, gb] = empty_input_grads(s, weight, bias, {need_x, need_w, need_b});
      none[0] = value(gi);
      none[1] = value(gw);
      none[2] = value(gb);
      none[3] = need_r ? at::zeros_like(residual) : Tensor();
      return none;
    }
    using ActGrads = std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>, optional<Tensor>>;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnext::batch_norm_act_backward", "")
                         .typed<ActGrads(
                             const Tensor&, const Tensor&, bool, const optional<Tensor>&,
                             const optional<Tensor>&, const optional<Tensor>&,
                             const optional<Tensor>&, const optional<Tensor>&,
                             const optional<Tensor>&, const optional<Tensor>&, bool, double,
                             c10::string_view, double, std::array<bool, 4>)>();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gr, gw, gb] = op.call(
        grad_output, s, ctx->saved_data["memory_saving"].toBool(), maybe(weight), maybe(bias),
        maybe(residual), std::nullopt, std::nullopt, maybe(saved[4]), maybe(saved[5]),
        /*train=*/true, ctx->saved_data["eps"].toDouble(), activation,
        ctx->saved_data["negative_slope"].toDouble(), {need_x, need_r, need_w, need_b});
    none[0] = value(gi);
    none[1] = value(gw);
    none[2] = cast_like(gb, bias);
    none[3] = value(gr);
    return none;
  }
};

Tensor batch_norm_train_step_autograd(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked,
    optional<double> momentum,
    double eps) {
  check_statistics_not_differentiable(running_mean, running_var, "bnext::batch_norm_train_step");
  return TrainStepFunction::apply(
      input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)[0];
}

Tensor batch_norm_act_train_step_autograd(
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
  check_statistics_not_differentiable(
      running_mean, running_var, "bnext::batch_norm_act_train_step");
  return ActTrainStepFunction::apply(
      input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
      eps, activation, negative_slope, memory_saving)[0];
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  const variable_list r = TrainFunction::apply(input, weight, bias, eps);
  return {r[0], r[1], r[2], r[3]};
}

Tensor batch_norm_eval_autograd(
    const Tensor& input,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  check_statistics_not_differentiable(running_mean, running_var, "bnext::batch_norm_eval");
  return EvalFunction::apply(input, running_mean, running_var, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
  m.impl("batch_norm_train_step", &batch_norm_train_step_autograd);
  m.impl("batch_norm_act_train_step", &batch_norm_act_train_step_autograd);
}

}  // namespace bnext
