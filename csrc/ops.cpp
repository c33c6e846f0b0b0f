// The single place where bnext's operator schemas are declared.
// Backends register kernels with TORCH_LIBRARY_IMPL(bnext, <Key>, m); Python
// registers fake kernels and autograd formulas (bnext/_ops/, one module per op family).
//
// Why the training forward is split from the running-stat update:
// torch.library.register_autograd refuses ops that mutate their inputs, so the
// differentiable op is functional and the in-place update is a separate op
// with no autograd of its own (its inputs are non-differentiable statistics).
#include <torch/library.h>

TORCH_LIBRARY(bnext, m) {
  // Batch statistics + normalization + affine in one op.
  // Per-channel outputs: save_mean in float64 (so backward can subtract the
  // exact mean even when |mean| >> std; torch's CPU kernels get the same
  // effect from double accumulators), save_invstd and unbiased_var in
  // float32 (float64 for float64 input). unbiased_var feeds
  // update_running_stats so that the running variance never has to be
  // recovered from invstd (lossy near eps).
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor unbiased_var)");

  // Normalization with given running statistics (inference). The running
  // statistics are optional in the schema so that their absence gets
  // torch's error (RuntimeError) from the op's own validation.
  m.def(
      "batch_norm_eval(Tensor input, Tensor? running_mean, Tensor? running_var, "
      "Tensor? weight, Tensor? bias, float eps) -> Tensor");

  // A whole training call as torch.nn.functional.batch_norm makes it, in one
  // op: validation of every argument (check_batch_norm_call), then
  // batch_norm_train, then num_batches_tracked += 1 and the running-stat
  // update (update_running_stats' rule), in that order, so a rejected call
  // mutates nothing. The modules' training forward is this one call. Its
  // autograd kernel is C++ (csrc/autograd.cpp): torch.library refuses
  // formulas for ops that mutate, and the mutation is of statistics that
  // get no gradient. Only the output is returned: every returned tensor
  // becomes a Python object per call, and the statistics the backward needs
  // stay inside the autograd node.
  m.def(
      "batch_norm_train_step(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps) -> Tensor");

  // running = (1 - f) * running + f * batch, with f = momentum, or
  // f = 1 / num_batches_tracked when momentum is None (cumulative average).
  // Reading num_batches_tracked on the device keeps the op free of host syncs
  // and of data-dependent guards under torch.compile.
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor save_mean, Tensor unbiased_var, float? momentum, "
      "Tensor? num_batches_tracked) -> ()");

  // Same contract as aten::native_batch_norm_backward: train=True uses
  // save_mean/save_invstd, train=False uses running_mean/running_var and eps.
  // Outputs whose output_mask entry is false are None.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? running_mean, Tensor? running_var, Tensor? save_mean, "
      "Tensor? save_invstd, bool train, float eps, bool[3] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?)");

  // Fused BatchNorm + residual add + activation:
  //   output = act(batch_norm(input) + residual).
  // activation: identity | relu | leaky_relu (negative_slope) | elu (alpha 1)
  //   | silu | gelu (erf) | gelu_tanh.
  // memory_saving declares that backward will run from the output instead
  // of the input; the forward then checks what that needs (an invertible
  // activation, no zero weight) before anything is mutated.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, float eps, str activation, float negative_slope, "
      "bool memory_saving) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor unbiased_var)");
  // batch_norm_train_step for the fused op.
  m.def(
      "batch_norm_act_train_step(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, str activation, "
      "float negative_slope, bool memory_saving) -> Tensor");
  m.def(
      "batch_norm_act_eval(Tensor input, Tensor? running_mean, Tensor? running_var, "
      "Tensor? weight, Tensor? bias, Tensor? residual, float eps, str activation, "
      "float negative_slope, bool memory_saving) -> Tensor");

  // `saved` is the forward's input, or its output when saved_is_output
  // (memory_saving: x_hat is recovered by inverting the activation).
  // Returns (grad_input, grad_residual, grad_weight, grad_bias); entries whose
  // output_mask is false are None.
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor saved, "
      "bool saved_is_output, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor? running_mean, Tensor? running_var, Tensor? save_mean, "
      "Tensor? save_invstd, bool train, float eps, str activation, "
      "float negative_slope, bool[4] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?)");

  // check_batch_norm_call alone, for the paths that compose several ops
  // (under torch.func transforms): the same validation, before any of them.
  m.def(
      "check_batch_norm_call(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, Tensor? num_batches_tracked, "
      "bool training, float eps) -> ()");

  // ---- Phases of a training step, for statistics that span processes
  // (SyncBatchNorm), after apex's welford.cu and torch's batch_norm_stats /
  // batch_norm_gather_stats_with_counts / batch_norm_elemt /
  // batch_norm_backward_reduce / batch_norm_backward_elemt. They run the
  // single-device ops' passes; those ops stay one call each.
  //
  // Local statistics as a (3, C) float64 tensor of rows (count, mean, M2):
  // ranks exchange them with one all_gather and merge them exactly, whatever
  // their batch sizes (an empty batch is a row of zeros).
  m.def("batch_norm_moments(Tensor input) -> Tensor");

  // Merge of a (K, 3, C) stack of moments (Chan et al.): per channel, all
  // float64, the mean, invstd = 1/sqrt(M2/n + eps), the unbiased variance
  // M2/(n-1) for update_running_stats, and the count n. On the CPU a total
  // count of at most 1 raises ValueError, as torch's SyncBatchNorm does; on
  // CUDA that check would need a host synchronisation and is not made.
  m.def(
      "batch_norm_merge_moments(Tensor moments, float eps) "
      "-> (Tensor mean, Tensor invstd, Tensor unbiased_var, Tensor count)");

  // act((x - mean) * invstd * weight + bias + residual) with given
  // statistics (mean float64 or acc, invstd float32/64): the forward pass of
  // batch_norm_act_train without its statistics.
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, Tensor? residual, str activation, float negative_slope) -> Tensor");

  // Backward, first pass: with g = grad_output * act'(z), the local sums
  // sums = [sum g, sum g * (x - mean)] as one (2, C) float64 tensor (one
  // all_reduce adds the ranks' up), this rank's grad_weight and grad_bias,
  // and g itself as grad_residual. output_mask: (weight, bias, residual).
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, str activation, "
      "float negative_slope, bool[3] output_mask) "
      "-> (Tensor sums, Tensor? grad_weight, Tensor? grad_bias, Tensor? grad_residual)");

  // Backward, second pass: grad_input from the global sums and the global
  // count (count from batch_norm_merge_moments). With a residual, g is the
  // first pass's grad_residual (required then), as in the fused backward.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor? grad_residual, Tensor sums, Tensor count, str activation, "
      "float negative_slope) -> Tensor");
}
