// fusedclip._host: the per-call check of the steady-state fast path (python/fusedclip/fastpath.py).
//
// A call that sees the same tensors as an earlier one may reuse that call's plan. "The same" is what a plan depends
// on: for each element of the caller's list (a parameter, whose .grad is read, or a tensor), whether a tensor is
// there and, if so, its address, element count, dtype, device, dispatch keys (dense or sparse, a Python subclass, a
// conjugate or negative view all differ there) and contiguity. Python needs about 1 us per element to read those; here
// it is one type check, one .grad read and a few compares. Only metadata is read, never data, and nothing needs CUDA:
// this extension builds against any torch, the CPU-only build included.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

// The torch this was built against, as one token (setup.py: torch.__version__ with anything but [0-9A-Za-z.+]
// replaced by '_'): the loader refuses a build for another torch, whose C++ ABI may differ.
#ifndef FUSEDCLIP_TORCH_VERSION
#define FUSEDCLIP_TORCH_VERSION unknown
#endif
#define FUSEDCLIP_STR2(x) #x
#define FUSEDCLIP_STR(x) FUSEDCLIP_STR2(x)

namespace {

// One element's state, as a kept plan depends on it.
struct Sig {
  bool present = false;  // a tensor is there (not None, or a parameter with a .grad)
  const void* data = nullptr;
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  c10::DispatchKeySet keys;
};

bool kernel_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

// Why a present tensor cannot take part in a kept plan, or "" when it can: a plain, dense, contiguous CPU or CUDA
// tensor of a dtype the kernels read, with at least one element (the general path leaves zero-size ones out).
std::string unfit(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::DispatchKeySet keys = impl->key_set();
  if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize) ||
      keys.has(c10::DispatchKey::FuncTorchBatched) || keys.has(c10::DispatchKey::FuncTorchGradWrapper)) {
    return "a tensor subclass or wrapper";
  }
  if (t.layout() != c10::kStrided) return "not strided";
  if (!(t.device().is_cpu() || t.device().is_cuda())) return "neither on CPU nor on CUDA";
  if (!impl->has_storage()) return "without storage";
  if (!kernel_dtype(t.scalar_type())) return "of a dtype other than float32, float16, bfloat16 and float64";
  if (t.is_neg() || t.is_conj()) return "a negative or conjugate view";
  if (!impl->is_contiguous()) return "not contiguous";
  if (impl->numel() == 0) return "zero-size";
  return "";
}

class Signatures {
 public:
  // `items`: the caller's list (or tuple); `grads`: its elements are parameters whose .grad counts (else tensors).
  Signatures(py::handle items, bool grads) : grads_(grads) {
    PyObject* seq = items.ptr();
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) {
      why_ = "not a list or tuple";
      return;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** elems = PySequence_Fast_ITEMS(seq);
    sigs_.resize(static_cast<size_t>(n));
    std::vector<const void*> addresses;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor* t = nullptr;
      if (!element(elems[i], &t)) {
        why_ = "element " + std::to_string(i) + " is not a plain Tensor or Parameter (or None)";
        return;
      }
      if (t == nullptr || !t->defined()) continue;
      const std::string reason = unfit(*t);
      if (!reason.empty()) {
        why_ = "tensor " + std::to_string(i) + " is " + reason;
        return;
      }
      Sig& s = sigs_[static_cast<size_t>(i)];
      const c10::TensorImpl* impl = t->unsafeGetTensorImpl();
      s.present = true;
      s.data = impl->data();
      s.numel = impl->numel();
      s.dtype = t->scalar_type();
      s.device = impl->device();
      s.keys = impl->key_set();
      addresses.push_back(s.data);
      ++present_;
    }
    std::sort(addresses.begin(), addresses.end());
    if (std::adjacent_find(addresses.begin(), addresses.end()) != addresses.end()) {
      why_ = "two elements hold tensors at the same address";
      return;
    }
    eligible_ = true;
  }

  bool eligible() const { return eligible_; }
  const std::string& why_not() const { return why_; }
  size_t size() const { return sigs_.size(); }
  size_t present() const { return present_; }

  // Whether every element of `items` is what it was when this was built.
  bool matches(py::handle items) const { return walk(items.ptr(), nullptr); }

  // The present tensors of `items` (the .grad of each parameter that has one), in order, when `items` matches;
  // else None.
  py::object collect(py::handle items) const {
    if (!eligible_) return py::none();
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(present_));
    if (out == nullptr) throw py::error_already_set();
    py::object owned = py::reinterpret_steal<py::object>(out);
    if (!walk(items.ptr(), out)) return py::none();
    return owned;
  }

 private:
  // The tensor element `obj` stands for, in *t (nullptr or an undefined tensor: absent). False when `obj` is not a
  // plain Tensor or Parameter (a subclass may change what .grad or the data mean), or None in place of a parameter.
  bool element(PyObject* obj, const at::Tensor** t) const {
    if (!grads_ && obj == Py_None) {
      *t = nullptr;
      return true;
    }
    if (!THPVariable_CheckExact(obj)) return false;
    const at::Tensor& var = THPVariable_Unpack(obj);
    if (!grads_) {
      *t = &var;
      return true;
    }
    // Reading the .grad of a non-leaf tensor that does not retain it warns (in Python as in C++): such an element is
    // left to the general path, which reads .grad the Python way. TensorImpl::grad itself never warns.
    if (!var.is_leaf() && !var.retains_grad()) return false;
    *t = &var.unsafeGetTensorImpl()->grad();
    return true;
  }

  // Compares every element with its signature; fills `out` (a list of present_ slots) on the way when given.
  // With zero_grad(set_to_none=True) every .grad is a new tensor whose TensorImpl and storage are not in cache: the
  // walk resolves each element kAhead elements early and prefetches what the compares will read, so those misses
  // overlap instead of adding up (about half the check's time at 2,000 fresh gradients).
  bool walk(PyObject* seq, PyObject* out) const {
    if (!eligible_ || (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq))) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != static_cast<Py_ssize_t>(sigs_.size())) return false;
    PyObject** elems = PySequence_Fast_ITEMS(seq);
    constexpr Py_ssize_t kAhead = 8;
    const at::Tensor* ahead[kAhead];
    bool plain[kAhead];
    const auto resolve = [&](Py_ssize_t k) {
      const Py_ssize_t slot = k % kAhead;
      const at::Tensor* t = nullptr;
      plain[slot] = element(elems[k], &t);
      ahead[slot] = t;
      if (plain[slot] && t != nullptr && t->defined()) {
        const c10::TensorImpl* impl = t->unsafeGetTensorImpl();
        for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(impl) + line);
        }
      }
    };
    for (Py_ssize_t k = 0; k < std::min(n, kAhead); ++k) resolve(k);
    Py_ssize_t j = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const Py_ssize_t slot = i % kAhead;
      const bool is_plain = plain[slot];
      const at::Tensor* t = ahead[slot];
      if (i + kAhead < n) resolve(i + kAhead);  // (no Python runs during the walk: the pointers stay valid)
      if (i + kAhead / 2 < n) {  // its TensorImpl was prefetched kAhead / 2 elements ago: now its storage
        const at::Tensor* u = ahead[(i + kAhead / 2) % kAhead];
        if (plain[(i + kAhead / 2) % kAhead] && u != nullptr && u->defined()) {
          __builtin_prefetch(u->unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
        }
      }
      const Sig& s = sigs_[static_cast<size_t>(i)];
      if (!is_plain) return false;
      if (t == nullptr || !t->defined()) {
        if (s.present) return false;
        continue;
      }
      if (!s.present) return false;
      const c10::TensorImpl* impl = t->unsafeGetTensorImpl();
      if (impl->key_set() != s.keys || t->scalar_type() != s.dtype || impl->numel() != s.numel ||
          impl->device() != s.device || !impl->is_contiguous() || impl->data() != s.data) {
        return false;
      }
      if (out != nullptr) {
        PyObject* item = grads_ ? THPVariable_Wrap(*t) : (Py_INCREF(elems[i]), elems[i]);
        if (item == nullptr) throw py::error_already_set();
        PyList_SET_ITEM(out, j, item);
      }
      ++j;
    }
    return true;
  }

  bool grads_;
  bool eligible_ = false;
  std::string why_;
  std::vector<Sig> sigs_;
  size_t present_ = 0;
};

// fusedclip.distributed's kept calls over DTensor parameters: each parameter's .grad and, beside it, that gradient's
// `_local_tensor` (None for both where a parameter has no gradient), as two lists; None when an element is not a
// tensor, or is a non-leaf that does not retain its gradient (the general path reads it the Python way and warns).
// Python's .grad getter costs about 0.3 us on a tensor subclass: here it is a pointer read, and the gradient's
// Python object is the one its TensorImpl already holds. The placements and addresses are checked by the caller.
py::object grads_and_locals(py::handle items) {
  PyObject* seq = items.ptr();
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** elems = PySequence_Fast_ITEMS(seq);
  static PyObject* local_name = PyUnicode_InternFromString("_local_tensor");
  // Three passes, each prefetching kAhead elements early what it reads next (parameter object, its TensorImpl and
  // autograd meta; the gradient's TensorImpl; the gradient's object), so that the cache misses of thousands of
  // objects overlap instead of adding up. No Python runs before the last pass: the pointers stay valid.
  constexpr Py_ssize_t kAhead = 8;
  for (Py_ssize_t k = 0; k < n; ++k) {
    if (!THPVariable_Check(elems[k])) return py::none();
  }
  std::vector<const at::Tensor*> grad(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      __builtin_prefetch(THPVariable_Unpack(elems[i + kAhead]).unsafeGetTensorImpl());
    }
    if (i + kAhead / 2 < n) {
      __builtin_prefetch(THPVariable_Unpack(elems[i + kAhead / 2]).unsafeGetTensorImpl()->autograd_meta());
    }
    const at::Tensor& var = THPVariable_Unpack(elems[i]);
    if (!var.is_leaf() && !var.retains_grad()) return py::none();
    const at::Tensor& g = var.unsafeGetTensorImpl()->grad();
    grad[static_cast<size_t>(i)] = g.defined() ? &g : nullptr;
  }
  py::list grads(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kAhead < n && grad[static_cast<size_t>(i + kAhead)] != nullptr) {
      __builtin_prefetch(grad[static_cast<size_t>(i + kAhead)]->unsafeGetTensorImpl());
    }
    PyObject* g = Py_None;
    if (grad[static_cast<size_t>(i)] == nullptr) {
      Py_INCREF(Py_None);
    } else {
      g = THPVariable_Wrap(*grad[static_cast<size_t>(i)]);
      if (g == nullptr) throw py::error_already_set();
    }
    PyList_SET_ITEM(grads.ptr(), i, g);
  }
  py::list locals(n);
  PyObject** found = PySequence_Fast_ITEMS(grads.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(found[i + kAhead]);
    PyObject* local = Py_None;
    if (found[i] != Py_None) {
      local = PyObject_GetAttr(found[i], local_name);
      if (local == nullptr) {  // not a DTensor: the caller's placement check refuses it
        PyErr_Clear();
        local = Py_None;
        Py_INCREF(Py_None);
      }
    } else {
      Py_INCREF(Py_None);
    }
    PyList_SET_ITEM(locals.ptr(), i, local);
  }
  return py::make_tuple(grads, locals);
}

}  // namespace

void add_cpu_passes(py::module_& m);  // cpu_passes.cpp

PYBIND11_MODULE(_host, m) {
  m.doc() = "fusedclip's host fast path (the per-call check that a list's tensors are where a kept plan says) and the "
            "torch backend's CPU passes in one parallel region";
  py::class_<Signatures>(m, "Signatures")
      .def(py::init<py::handle, bool>(), py::arg("items"), py::arg("grads"))
      .def_property_readonly("eligible", &Signatures::eligible)
      .def_property_readonly("why_not", &Signatures::why_not)
      .def_property_readonly("present", &Signatures::present)
      .def("__len__", &Signatures::size)
      .def("matches", &Signatures::matches, py::arg("items"))
      .def("collect", &Signatures::collect, py::arg("items"));
  m.def("grads_and_locals", &grads_and_locals, py::arg("items"),
        "each parameter's .grad and that gradient's _local_tensor (None where absent), or None for an element that "
        "is not a tensor or a non-leaf without retained gradient");
  m.attr("TORCH_VERSION") = FUSEDCLIP_STR(FUSEDCLIP_TORCH_VERSION);
  add_cpu_passes(m);
}
