"""ddpm_jax.torch_checkpoint: torch.save'd state dicts read without torch, and pickles that would
execute code refused before anything runs.

torch is the reference here (a test extra): it writes the files, in both layouts torch.load reads
(the zip layout of torch >= 1.6 and the legacy stream of pickles of the FID Inception weights).
Values must come back bit for bit (they are copied, not computed).
"""

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ddpm_jax import torch_checkpoint as tc  # noqa: E402


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    sd["bn.running_var"] = torch.rand(8, generator=g) + 0.5
    sd["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    sd["transposed"] = sd["conv.weight"][:, 0].transpose(1, 2)  # a non-contiguous view of a shared storage
    sd["strided"] = base[1:, ::2]  # storage offset and a stride of 2
    sd["half"] = torch.randn(5, generator=g).half()
    sd["bf16"] = torch.randn(5, generator=g).to(torch.bfloat16)
    sd["mask"] = torch.tensor([True, False, True])
    sd["bytes"] = torch.arange(7, dtype=torch.uint8)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.ones(2, 2))
    sd["nested"] = {"a": torch.arange(3, dtype=torch.int32), "list": [torch.tensor(1.5)]}
    return sd


def _expected(t):
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _check_equal(got, ref, name="state"):
    if isinstance(ref, dict):
        assert set(got) == set(ref), name
        for k in ref:
            _check_equal(got[k], ref[k], f"{name}.{k}")
    elif isinstance(ref, (list, tuple)):
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            _check_equal(g, r, f"{name}[{i}]")
    else:
        want = _expected(ref)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.flags.c_contiguous and got.dtype.isnative, name
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_state_dict_round_trip_bit_for_bit(tmp_path, zip_layout):
    sd = _state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_layout)
    got = tc.load_state_dict(path)
    _check_equal(got, sd)
    assert got["half"].dtype == np.float16 and got["bf16"].dtype.name == "bfloat16" and got["mask"].dtype == bool
    assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"].dtype == np.int64
    # a real module's state dict (its OrderedDict carries _metadata, set by the pickle's BUILD)
    path2 = tmp_path / "bn.pth"
    torch.save(torch.nn.BatchNorm2d(4).state_dict(), path2, _use_new_zipfile_serialization=zip_layout)
    assert set(tc.load_state_dict(path2)) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class _Evil:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _marker_cmd(marker):
    return f"touch {marker}"


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_refuses_a_pickle_that_would_execute_code(tmp_path, zip_layout):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    # torch.save pickles the object's __reduce__: a GLOBAL of os.system (posix.system) and a REDUCE
    torch.save({"w": torch.ones(2), "x": _Evil(os.system, _marker_cmd(marker))}, path,
               _use_new_zipfile_serialization=zip_layout)
    with pytest.raises(tc.UnsafePickleError) as e:
        tc.load_state_dict(path)
    msg = str(e.value)
    assert "system" in msg and "nothing was executed" in msg and "\n" not in msg, msg
    assert not marker.exists(), "the pickle's os.system call ran"


def test_refuses_every_callable_outside_the_rebuild_set(tmp_path):
    marker = tmp_path / "executed"
    for fn, args, name in [(eval, (f"open({str(marker)!r}, 'w')",), r"\.eval\b"),  # __builtin__.eval at protocol 2
                           (getattr, (0, "real"), r"\.getattr\b"),
                           (np.load, (str(tmp_path / "x.npy"),), r"numpy\.")]:
        data = pickle.dumps({"x": _Evil(fn, *args)}, protocol=2)
        with pytest.raises(tc.UnsafePickleError, match=name):
            tc._unpickle(data, "test")  # noqa: SLF001  (the pickle layer alone)
        # the same pickle as data.pkl of a zip archive
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", data)
        with pytest.raises(tc.UnsafePickleError):
            tc.load_state_dict(buf.getvalue())
    assert not marker.exists()


def test_malformed_files_are_one_line_errors(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32)}
    good = tmp_path / "good.pth"
    torch.save(sd, good, _use_new_zipfile_serialization=False)
    raw = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[:-10])
    (tmp_path / "text.pth").write_bytes(b"not a checkpoint at all")
    for name in ("truncated.pth", "text.pth"):
        with pytest.raises(tc.CheckpointFormatError) as e:
            tc.load_state_dict(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        tc.load_state_dict(tmp_path / "missing.pth")
    # a view that reaches past its storage (a crafted size): refused, not read out of bounds
    big = tmp_path / "big.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, big)
    with zipfile.ZipFile(big) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = entries[pkl].replace(b"K\x06\x85", b"K\x07\x85")  # size (6,) -> (7,)
    bad = tmp_path / "oob.pth"
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    with pytest.raises(tc.CheckpointFormatError, match="reaches element 6"):
        tc.load_state_dict(bad)
