#include "primitive/cpu_primitive.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

#include <cstring>
#include <stdexcept>

namespace mlx_harmony_core {

namespace {

// How many arrays share `a`'s descriptor. MLX's is_donatable() wants one,
// but make_arrays gives every output of a multi-output primitive its own
// copy of the inputs, so an input only the primitive holds has one
// reference per output. The count is private to mx::array: read through the
// explicit-instantiation rule (access checks do not apply to the names in an
// explicit instantiation's template arguments).
template <auto Desc>
struct DescAccess {
  friend long desc_refs(const mx::array& a) {
    return (a.*Desc).use_count();
  }
};
template struct DescAccess<&mx::array::array_desc_>;
long desc_refs(const mx::array& a);

// Whether output `o` may take input `in`'s buffer: nothing but this
// primitive's outputs holds it (nor, unless shared_data, its data), it is
// row-contiguous and of o's size and dtype.
bool can_donate(const mx::array& in,
                const mx::array& o,
                size_t n_outputs,
                bool shared_data) {
  return desc_refs(in) == long(n_outputs) &&
         (shared_data || in.data_shared_ptr().use_count() == 1) &&
         in.data_shared_ptr()->is_owned() && in.flags().row_contiguous &&
         in.data_size() == in.size() && in.dtype() == o.dtype() &&
         in.size() == o.size();
}

} // namespace

std::vector<mx::array> weak(const std::vector<mx::array>& inputs) {
  std::vector<mx::array> v;
  v.reserve(inputs.size());
  for (auto& a : inputs) {
    v.push_back(mx::array::unsafe_weak_copy(a));
  }
  return v;
}

void CpuPrimitive::eval_cpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (size_t j = 0; j < outputs.size(); ++j) {
    auto& o = outputs[j];
    bool donated = false;
    for (const Donation& d : donate_) {
      if (size_t(d.out) == j &&
          can_donate(inputs[d.in], o, outputs.size(), d.shared_data)) {
        o.copy_shared_buffer(inputs[d.in]);
        donated = true;
        break;
      }
    }
    if (!donated) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
    }
    encoder.set_output_array(o);
  }
  encoder.dispatch([ins = weak(inputs),
                    outs = weak(outputs),
                    run = run_]() mutable { run(ins, outs); });
}

void CpuPrimitive::eval_gpu(const std::vector<mx::array>&,
                            std::vector<mx::array>&) {
  throw std::runtime_error(std::string(name_) +
                           " runs on the CPU; on a GPU stream the op returns "
                           "MLX's own");
}

namespace {

// The fallback as a function of the inputs at argnums only (the others, such
// as quantized weights, have no derivative).
std::function<std::vector<mx::array>(const std::vector<mx::array>&)>
of_args(const CpuPrimitive::Fallback& f,
        const std::vector<mx::array>& primals,
        const std::vector<int>& argnums) {
  return [f, primals, argnums](const std::vector<mx::array>& xs) {
    auto all = primals;
    for (size_t i = 0; i < argnums.size(); ++i) {
      all[argnums[i]] = xs[i];
    }
    return f(all);
  };
}

std::vector<mx::array> picked(const std::vector<mx::array>& primals,
                              const std::vector<int>& argnums) {
  std::vector<mx::array> v;
  for (int a : argnums) {
    v.push_back(primals[a]);
  }
  return v;
}

} // namespace

void CpuPrimitive::check_fallback(const char* transform) const {
  if (!fallback_) {
    throw std::invalid_argument(std::string(name_) + " has no " + transform +
                                "; it is not differentiable or mappable");
  }
}

std::vector<mx::array>
CpuPrimitive::vjp(const std::vector<mx::array>& primals,
                  const std::vector<mx::array>& cotangents,
                  const std::vector<int>& argnums,
                  const std::vector<mx::array>&) {
  check_fallback("vjp");
  return mx::vjp(of_args(fallback_, primals, argnums),
                 picked(primals, argnums),
                 cotangents)
      .second;
}

std::vector<mx::array> CpuPrimitive::jvp(const std::vector<mx::array>& primals,
                                         const std::vector<mx::array>& tangents,
                                         const std::vector<int>& argnums) {
  check_fallback("jvp");
  return mx::jvp(of_args(fallback_, primals, argnums),
                 picked(primals, argnums),
                 tangents)
      .second;
}

std::pair<std::vector<mx::array>, std::vector<int>>
CpuPrimitive::vmap(const std::vector<mx::array>& inputs,
                   const std::vector<int>& axes) {
  check_fallback("vmap");
  auto fn = [f = fallback_](const std::vector<mx::array>& xs) { return f(xs); };
  auto outs = mx::vmap(fn, axes)(inputs);
  return {outs, std::vector<int>(outs.size(), 0)};
}

bool CpuPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const CpuPrimitive*>(&other);
  return o && !key_.empty() && std::strcmp(o->name_, name_) == 0 &&
         o->key_ == key_;
}

} // namespace mlx_harmony_core
