// Autograd kernels of the two plain forward ops, for every backend.
//
// Why C++: a torch.library.register_autograd formula runs Python at every
// call, measured ~25 us per training forward with grad (~9 us even without),
// against ~2 us for the op itself; at ResNet-50's 7x7 layers that was 10-15%
// of a training step's batch-norm time. These nodes do what the Python
// formulas in bnext/_autograd.py did:
//  - batch_norm_train: only `output` is differentiable; saves input, weight,
//    bias, save_mean, save_invstd.
//  - batch_norm_eval: the running statistics get no gradient (as torch).
//  - backward: bnext::batch_norm_backward below autograd, or through its
//    own autograd formula when the graph is being recorded (create_graph):
//    that formula (Python, closed-form VJP) gives double backward.
// While a torch.func transform is active, bnext/_autograd.py routes calls
// through new-style Python autograd.Functions instead (tested there; these
// nodes are not tested under transforms).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

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
      const Tensor& running_mean,
      const Tensor& running_var,
      const optional<Tensor>& weight,
      const optional<Tensor>& bias,
      double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnext::batch_norm_eval", "")
                         .typed<Tensor(
                             const Tensor&, const Tensor&, const Tensor&,
                             const optional<Tensor>&, const optional<Tensor>&, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(input, running_mean, running_var, weight, bias, eps);
    ctx->save_for_backward({input, running_mean, running_var, value(weight), value(bias)});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) {
      return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const variable_list saved = ctx->get_saved_variables();
    auto [gi, gw, gb] = call_backward(
        grad_output, saved[0], saved[3], saved[1], saved[2], Tensor(), Tensor(),
        /*train=*/false, ctx->saved_data["eps"].toDouble(),
        output_mask(ctx, 3, saved[3].defined(), saved[4].defined()));
    // Like torch's batch norm, the running statistics get no gradient.
    return {value(gi), Tensor(), Tensor(), value(gw), cast_like(gb, saved[4]), Tensor()};
  }
};

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
    const Tensor& running_mean,
    const Tensor& running_var,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  return EvalFunction::apply(input, running_mean, running_var, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace bnext
