// The host side of EMA's cached plan, so that an update of N tensors costs a few
// microseconds of Python instead of O(N) Python-level work (ema_fused/_host_path.py
// uses it; without the extension the same checks run in Python):
//
//  * Snapshot: the tensors a plan was built from, where they were read (the modules'
//    parameter and buffer dicts), the module tree's edges and dict sizes, and every
//    tensor's layout.  still_valid() says, in one call, whether a fresh read of the
//    model would give the very same tensors: the same objects, wrapping the same
//    TensorImpl (torch.utils.swap_tensors changes it), at the same data address, with
//    the same dtype, device, sizes and strides; and the same tree (no module replaced,
//    removed or added, no parameter or buffer added or removed).
//  * PairSet: pairs held here, so the kernel ops run on them through the dispatcher
//    without converting 2 x N Python tensors on every call.  The ops still check every
//    pair and take each address from the live TensorImpl, so nothing is ever written
//    through an address recorded earlier.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>

#include <vector>

namespace ema_fused {
namespace {

namespace py = pybind11;

// A tensor's identity and layout, as recorded when a plan was built.
struct Layout {
  const c10::TensorImpl* impl = nullptr;
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  bool requires_grad = false;  // a frozen parameter that became trainable is a model change
  c10::SmallVector<int64_t, 4> sizes, strides;

  static bool data_of(const at::Tensor& t, const void** out) {
    if (!t.defined() || !t.has_storage()) return false;
    *out = t.const_data_ptr();  // no copy-on-write materialisation
    return true;
  }

  explicit Layout(const at::Tensor& t)
      : impl(t.unsafeGetTensorImpl()), dtype(t.scalar_type()), device(t.device()),
        requires_grad(t.requires_grad()), sizes(t.sizes().begin(), t.sizes().end()),
        strides(t.strides().begin(), t.strides().end()) {
    TORCH_CHECK(data_of(t, &data), "Snapshot: a tensor without storage cannot be watched");
  }

  bool same(const at::Tensor& t) const {
    const void* now = nullptr;
    return t.unsafeGetTensorImpl() == impl && data_of(t, &now) && now == data &&
           t.scalar_type() == dtype && t.device() == device &&
           t.requires_grad() == requires_grad && t.sizes() == c10::IntArrayRef(sizes) &&
           t.strides() == c10::IntArrayRef(strides);
  }
};

const at::Tensor* tensor_of(PyObject* obj) {
  return obj != nullptr && THPVariable_Check(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

// For objects checked with tensor_of when they were recorded: a Python object that is
// a tensor stays one (even torch.utils.swap_tensors only swaps tensors' contents).
const at::Tensor& held_tensor(const py::object& obj) { return THPVariable_Unpack(obj.ptr()); }

std::vector<py::object> objects(const py::list& items) {
  std::vector<py::object> out;
  out.reserve(items.size());
  for (const auto& item : items) out.push_back(py::reinterpret_borrow<py::object>(item));
  return out;
}

std::vector<py::dict> dicts(const py::list& items, const char* what) {
  std::vector<py::dict> out;
  out.reserve(items.size());
  for (const auto& item : items) {
    TORCH_CHECK(PyDict_Check(item.ptr()), "Snapshot: ", what, " must be dicts, got ",
                Py_TYPE(item.ptr())->tp_name);
    out.push_back(py::reinterpret_borrow<py::dict>(item));
  }
  return out;
}

class Snapshot {
 public:
  // links: (parent dict, key, child): parent[key] must still be child (module tree
  // edges).  sized: dicts whose sizes must not change.  slots: where each watched
  // tensor is read (dict, key); empty when the caller holds the tensors itself.
  // tensors: the watched tensors (read from the slots, in order); fixed: tensors the
  // caller owns (the shadows) whose layout must not change.
  Snapshot(const py::list& link_dicts, const py::list& link_keys, const py::list& link_children,
           const py::list& sized, const py::list& slot_dicts, const py::list& slot_keys,
           const py::list& tensors, const py::list& fixed)
      : link_dicts_(dicts(link_dicts, "link dicts")), link_keys_(objects(link_keys)),
        link_children_(objects(link_children)), sized_(dicts(sized, "sized dicts")),
        slot_dicts_(dicts(slot_dicts, "slot dicts")), slot_keys_(objects(slot_keys)),
        tensors_(objects(tensors)), fixed_(objects(fixed)) {
    TORCH_CHECK(link_keys_.size() == link_dicts_.size() &&
                    link_children_.size() == link_dicts_.size(),
                "Snapshot: the link lists differ in length");
    TORCH_CHECK(slot_dicts_.empty() || (slot_dicts_.size() == tensors_.size() &&
                                        slot_keys_.size() == tensors_.size()),
                "Snapshot: the slot lists and the tensors differ in length");
    for (const auto& d : sized_) sizes_.push_back(PyDict_Size(d.ptr()));
    for (const auto* list : {&tensors_, &fixed_}) {
      for (const auto& obj : *list) {
        const at::Tensor* t = tensor_of(obj.ptr());
        TORCH_CHECK(t != nullptr, "Snapshot: expected tensors, got ", Py_TYPE(obj.ptr())->tp_name);
        layouts_.emplace_back(*t);
      }
    }
  }

  bool still_valid() const {
    if (cleared_) return false;
    for (size_t i = 0; i < link_dicts_.size(); ++i) {
      PyObject* now = PyDict_GetItemWithError(link_dicts_[i].ptr(), link_keys_[i].ptr());
      if (now == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return false;
      }
      if (now != link_children_[i].ptr()) return false;
    }
    for (size_t i = 0; i < sized_.size(); ++i) {
      if (PyDict_Size(sized_[i].ptr()) != sizes_[i]) return false;
    }
    for (size_t i = 0; i < slot_dicts_.size(); ++i) {
      PyObject* now = PyDict_GetItemWithError(slot_dicts_[i].ptr(), slot_keys_[i].ptr());
      if (now == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (now != tensors_[i].ptr()) return false;
    }
    size_t k = 0;
    for (const auto* list : {&tensors_, &fixed_}) {
      for (const auto& obj : *list) {
        if (!layouts_[k++].same(held_tensor(obj))) return false;
      }
    }
    return true;
  }

 // For the garbage collector (see gc_aware below).
  template <typename Visit>
  int visit_all(Visit&& visit) const {
    for (const auto& d : link_dicts_) if (int r = visit(d)) return r;
    for (const auto& o : link_keys_) if (int r = visit(o)) return r;
    for (const auto& o : link_children_) if (int r = visit(o)) return r;
    for (const auto& d : sized_) if (int r = visit(d)) return r;
    for (const auto& d : slot_dicts_) if (int r = visit(d)) return r;
    for (const auto& o : slot_keys_) if (int r = visit(o)) return r;
    for (const auto& o : tensors_) if (int r = visit(o)) return r;
    for (const auto& o : fixed_) if (int r = visit(o)) return r;
    return 0;
  }
  void clear() {
    cleared_ = true;
    link_dicts_.clear(), link_keys_.clear(), link_children_.clear(), sized_.clear();
    slot_dicts_.clear(), slot_keys_.clear(), tensors_.clear(), fixed_.clear();
  }

 private:
  bool cleared_ = false;
  std::vector<py::dict> link_dicts_;
  std::vector<py::object> link_keys_, link_children_;
  std::vector<py::dict> sized_;
  std::vector<Py_ssize_t> sizes_;
  std::vector<py::dict> slot_dicts_;
  std::vector<py::object> slot_keys_, tensors_, fixed_;
  std::vector<Layout> layouts_;
};

using ListsScalar = void(at::TensorList, at::TensorList, double);
using ListsScalarFlag = void(at::TensorList, at::TensorList, double, bool);
using ListsTensorFlag = void(at::TensorList, at::TensorList, const at::Tensor&, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The pairs are held as the Python tensor objects, not as C++ references to their
// TensorImpls: an extra reference would make torch.utils.swap_tensors (Module._apply
// under the swap-on-conversion flag, DTensor conversions) refuse the model's params.
// Each call unpacks the objects' current tensors.  Every op still checks every pair
// (pairs.h) and takes each address from the live TensorImpl.
//
// The ops have no autograd formula: called from Python they pass through torch's boxed
// autograd fallbacks, which box all 2 x N tensors and bump the written ones' version
// counters (about 45 us for 500 pairs on a 2-core VM).  Held pairs skip those keys and
// bump the first list's version counters here, as the fallback would.
class PairSet {
 public:
  PairSet(const py::list& a, const py::list& b) : a_(objects(a)), b_(objects(b)) {
    TORCH_CHECK(a_.size() == b_.size(), "PairSet: the first list has ", a_.size(),
                " tensors but the second has ", b_.size());
    for (const auto* list : {&a_, &b_}) {
      for (const auto& obj : *list) {
        TORCH_CHECK(tensor_of(obj.ptr()) != nullptr, "PairSet: expected tensors, got ",
                    Py_TYPE(obj.ptr())->tp_name);
      }
    }
  }
  void update(double weight, bool skip_nonfinite) const {
    static const auto handle = op<ListsScalarFlag>("ema_fused::kernel_update_");
    run([&](at::TensorList a, at::TensorList b) { handle.call(a, b, weight, skip_nonfinite); });
  }
  void update_graph_safe(const at::Tensor& weight, bool skip_nonfinite) const {
    static const auto handle = op<ListsTensorFlag>("ema_fused::kernel_update_graph_safe_");
    run([&](at::TensorList a, at::TensorList b) { handle.call(a, b, weight, skip_nonfinite); });
  }
  void copy(double scale) const {
    static const auto handle = op<ListsScalar>("ema_fused::kernel_copy_");
    run([&](at::TensorList a, at::TensorList b) { handle.call(a, b, scale); });
  }
  size_t size() const { return a_.size(); }

  template <typename Visit>
  int visit_all(Visit&& visit) const {
    for (const auto& o : a_) if (int r = visit(o)) return r;
    for (const auto& o : b_) if (int r = visit(o)) return r;
    return 0;
  }
  void clear() {
    cleared_ = true;
    a_.clear(), b_.clear();
  }

 private:
  static std::vector<at::Tensor> owned(const std::vector<py::object>& objs) {
    std::vector<at::Tensor> out;
    out.reserve(objs.size());
    for (const auto& obj : objs) out.push_back(held_tensor(obj));
    return out;
  }

  // Borrowed views of the objects' tensors: no reference-count traffic (two atomic
  // operations per tensor, about 40 us for 500 pairs on a 2-core VM).  Valid only
  // while the GIL is held: the Python objects alone keep the TensorImpls alive.
  struct Borrowed {
    std::vector<at::Tensor> list;
    explicit Borrowed(const std::vector<py::object>& objs) {
      list.reserve(objs.size());
      for (const auto& obj : objs) {
        list.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(held_tensor(obj)));
      }
    }
    ~Borrowed() {
      for (auto& t : list) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    }
  };

  static void bump_versions(at::TensorList written) {
    for (const auto& t : written) {
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  }

  // Called with the GIL held.  A CUDA call only queues work: the tensors are borrowed
  // and the GIL kept.  A CPU call with more than kLongCpu elements (a millisecond or
  // more of work) owns references and releases the GIL, so that it does not stall
  // other Python threads; a short one is run like a CUDA call.
  static constexpr int64_t kLongCpu = int64_t(1) << 20;

  bool long_cpu_call() const {
    if (!held_tensor(a_[0]).is_cpu()) return false;
    int64_t elements = 0;
    for (const auto& obj : a_) {
      elements += held_tensor(obj).numel();
      if (elements > kLongCpu) return true;
    }
    return false;
  }

  template <typename F>
  void run(F&& call) const {
    TORCH_CHECK(!cleared_, "PairSet: cleared by the garbage collector");
    if (a_.empty()) return;
    if (long_cpu_call()) {
      const std::vector<at::Tensor> a = owned(a_), b = owned(b_);
      {
        py::gil_scoped_release no_gil;
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        call(a, b);
      }
      bump_versions(a);
    } else {
      const Borrowed a(a_), b(b_);
      {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        call(a.list, b.list);
      }
      bump_versions(a.list);
    }
  }

  bool cleared_ = false;
  std::vector<py::object> a_, b_;
};

// The classes hold Python objects (dicts, modules, tensors) that may lead back to their
// owner (an EMA kept on its own model: model -> ema -> plan -> snapshot -> model's
// modules).  The garbage collector must see those references, or such a cycle would
// never be freed.
// Whether __init__ has built the C++ object (the collector can visit one before).
bool constructed(PyObject* self) {
  return reinterpret_cast<py::detail::instance*>(self)->get_value_and_holder().holder_constructed();
}

template <typename T>
py::custom_type_setup gc_aware() {
  return py::custom_type_setup([](PyHeapTypeObject* heap_type) {
    auto* type = &heap_type->ht_type;
    type->tp_flags |= Py_TPFLAGS_HAVE_GC;
    type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
      Py_VISIT(Py_TYPE(self));  // heap types own a reference to their type
      if (!constructed(self)) return 0;
      const T& me = py::cast<const T&>(py::handle(self));
      return me.visit_all([&](const py::handle& h) -> int {
        Py_VISIT(h.ptr());
        return 0;
      });
    };
    type->tp_clear = [](PyObject* self) -> int {
      if (constructed(self)) py::cast<T&>(py::handle(self)).clear();
      return 0;
    };
  });
}

}  // namespace

void bind_host_path(py::module_& m) {
  py::class_<Snapshot>(m, "Snapshot", gc_aware<Snapshot>())
      .def(py::init<const py::list&, const py::list&, const py::list&, const py::list&,
                    const py::list&, const py::list&, const py::list&, const py::list&>(),
           py::arg("link_dicts"), py::arg("link_keys"), py::arg("link_children"),
           py::arg("sized"), py::arg("slot_dicts"), py::arg("slot_keys"), py::arg("tensors"),
           py::arg("fixed"))
      .def("still_valid", &Snapshot::still_valid);
  // The GIL is released around the kernels, so a long CPU update does not stall other
  // Python threads.
  py::class_<PairSet>(m, "PairSet", gc_aware<PairSet>())
      .def(py::init<const py::list&, const py::list&>())
      .def("update_", &PairSet::update, py::arg("weight"), py::arg("skip_nonfinite") = false)
      .def("update_graph_safe_", &PairSet::update_graph_safe, py::arg("weight"),
           py::arg("skip_nonfinite") = false)
      .def("copy_", &PairSet::copy)
      .def("__len__", &PairSet::size);
}

}  // namespace ema_fused
