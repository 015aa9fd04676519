"""Calling Triton kernels: Triton's specializer is set up without importing torch (4.3-4.9 s of a GPU start)."""

import sys

import pytest

from pallas_kernels import _triton

libtriton = pytest.importorskip("triton._C.libtriton")


def test_the_specializer_is_set_up_with_torch_unimportable_and_torch_imports_afterwards(monkeypatch):
    """Triton 3.6's native specializer tries ``import torch`` on its first call (3.8, installed for the CPU tests,
    no longer does), so a stand-in with that behaviour takes its place."""
    attempts = []

    def specializer_that_imports_torch(backend, arg, is_const, specialize_value, align):
        try:
            import torch  # noqa: F401
            attempts.append("imported")
        except ImportError:
            attempts.append("ImportError")
        return ("i32", None)

    monkeypatch.setattr(libtriton, "native_specialize_impl", specializer_that_imports_torch)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    _triton.specialize_without_torch.__wrapped__()
    assert attempts == ["ImportError"]
    assert "torch" not in sys.modules  # not left blocked: a later `import torch` works


def test_a_torch_already_imported_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(libtriton, "native_specialize_impl", lambda *args: calls.append(args))
    torch_module = object()
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    _triton.specialize_without_torch.__wrapped__()
    assert calls == [] and sys.modules["torch"] is torch_module
