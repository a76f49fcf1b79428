// Autograd-key kernels of the densenet_fused ops.
//
// The ops are differentiated as a whole block by FusedDenseBlockFunction (densenet_fused/autograd/block.py),
// never one by one.  They must still be callable with tensors that require grad while grad mode
// is on: torch.export inlines the block's autograd.Function, so an exported program
// (ep.module()(x)) calls the ops directly with the model's Parameters.  The default autograd
// fallback of a custom op only skips autograd for the op itself: the ATen ops its kernel calls
// (at::mm_out, ...) then fail with "functions with out=... arguments don't support automatic
// differentiation".  These kernels run the op below autograd and, when grad mode is on and an
// input requires grad, give its outputs and the tensors it writes (e.g. the feature buffer
// slice `out`) an Error node: a backward through them raises the message below instead of
// returning a wrong or missing gradient.  running_stats_update carries no gradient (as
// BatchNorm's running statistics): it only runs below autograd and bumps version counters.
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// An Error node held as the autograd graph holds nodes: c10::intrusive_ptr in recent torch,
// std::shared_ptr before (pyproject: torch>=2.4).
using NodePtr = decltype(torch::autograd::Edge::function);

// A template with E a parameter, so that only the branch of this torch is instantiated.
template <typename P, typename E = torch::autograd::Error>
P make_node(const std::string& msg, torch::autograd::edge_list&& edges) {
  if constexpr (std::is_same_v<P, std::shared_ptr<torch::autograd::Node>>) {
    return P(new E(msg, std::move(edges)));
  } else {
    return c10::make_intrusive<E>(msg, std::move(edges));
  }
}

NodePtr make_error(const std::string& msg, const std::vector<at::Tensor>& inputs) {
  return make_node<NodePtr>(msg, torch::autograd::collect_next_edges(inputs));
}

template <typename F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) f(t);
  } else if (v.isList()) {
    for (const c10::IValue& e : v.toListRef()) {
      if (e.isTensor()) f(e.toTensor());
    }
  }
}

void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack,
                        bool attach_error) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  std::vector<at::Tensor> requiring, written;
  {
    auto args = torch::jit::last(*stack, n_args);
    for (size_t i = 0; i < n_args; ++i) {
      const auto* alias = schema.arguments()[i].alias_info();
      const bool write = alias != nullptr && alias->isWrite();
      for_each_tensor(args[i], [&](const at::Tensor& t) {
        if (!t.defined()) return;
        if (t.requires_grad()) requiring.push_back(t);
        if (write) written.push_back(t);
      });
    }
  }
  const bool track = attach_error && at::GradMode::is_enabled() && !requiring.empty();
  if (track) {
    for (const auto& t : written) torch::autograd::check_inplace(t, true);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : written) torch::autograd::increment_version(t);
  if (!track) return;
  const std::string msg =
      "densenet_fused::" + schema.name().substr(schema.name().find("::") + 2) +
      " has no derivative of its own: the fused module calling it (FusedDenseBlock, the fused stem, "
      "transition or head) is differentiated as a whole by its autograd.Function (eager and "
      "torch.compile), first order only.  A double backward through it, or a backward through a "
      "graph that calls the op directly (a torch.export program: run it for inference, e.g. under "
      "torch.no_grad()), is not supported.";
  NodePtr node = make_error(msg, requiring);
  for (const c10::IValue& v : torch::jit::last(*stack, schema.returns().size())) {
    for_each_tensor(v, [&](const at::Tensor& t) {
      if (t.defined() && torch::autograd::isDifferentiableType(t.scalar_type())) {
        torch::autograd::set_history(t, node);
      }
    });
  }
  // One node per written tensor: a view's history is rebased onto output 0 of its node.
  for (const auto& t : written) {
    if (torch::autograd::isDifferentiableType(t.scalar_type())) {
      torch::autograd::rebase_history(t, make_error(msg, requiring));
    }
  }
}

void no_derivative(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  run_below_autograd(op, ks, stack, true);
}

void no_gradient(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  run_below_autograd(op, ks, stack, false);
}

}  // namespace

// Ops differentiated as a whole by an autograd.Function (densenet_fused/autograd/): the block's
// (FusedDenseBlockFunction, block.py), the stem's (FusedStemFunction, stem.py), the transition's and the
// head's (FusedTransitionFunction, FusedHeadFunction in transition.py / head.py).
TORCH_LIBRARY_IMPL(densenet_fused, Autograd, m) {
  for (const char* op : {"channel_stats", "bn_grad_finish", "bn_scale_shift", "bnrelu_conv1x1_fwd",
                         "bnrelu_conv1x1_bwd", "bnrelu_conv3x3_fwd", "bnrelu_conv3x3_bwd",
                         "bnrelu_maxpool_fwd", "bnrelu_maxpool_bwd",
                         "bnrelu_avgpool_conv1x1_fwd", "bnrelu_avgpool_conv1x1_bwd",
                         "bnrelu_global_avgpool_fwd", "bnrelu_global_avgpool_bwd"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&no_derivative>());
  }
  m.impl("running_stats_update", torch::CppFunction::makeFromBoxedFunction<&no_gradient>());
}
