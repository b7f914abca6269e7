"""The Python mirrors (moekit._capi, the config dataclasses, the enums, the error classes) against
the C headers: every MOEKIT_API prototype, every struct (field names and types in order, and the
C compiler's own sizeof/offsetof), every constant (as the C compiler evaluates it). Adding a
function, a field or a constant to a header without mirroring it in Python fails here."""
import ctypes
import dataclasses
import os
import subprocess

import pytest

import moekit
from moekit import _capi, _config, _lib

_SCALARS = {"int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
            "uint8_t": ctypes.c_uint8, "size_t": ctypes.c_size_t, "float": ctypes.c_float}


def expected_ctype(header, t):
    """The ctypes type _capi must use for a C type (the rules in _capi's docstring)."""
    if t.pointer == 0:
        if t.base == "void":
            return None
        if t.base in _SCALARS:
            return _SCALARS[t.base]
        if t.base in header.enums:
            return ctypes.c_int
        if t.base in header.handles:
            return ctypes.c_void_p
        raise AssertionError("no ctypes rule for C type %s" % (t,))
    if t.pointer == 1 and t.base in _capi.STRUCTS:
        return ctypes.POINTER(_capi.STRUCTS[t.base])
    if t.pointer == 1 and t.base == "char" and t.const_pointee:
        return ctypes.c_char_p
    return ctypes.c_void_p


def expected_field_ctype(t):
    if t.pointer:
        return ctypes.c_void_p
    assert t.base in _SCALARS, "struct field of type %s has no ctypes rule" % (t,)
    return _SCALARS[t.base]


def test_the_parser_read_every_header(header):
    names = {f.header for f in header.functions.values()}
    assert {"status.h", "router.h", "tokens.h", "experts.h", "layer.h", "ep.h"} <= names
    assert len(header.functions) >= 50 and len(header.structs) >= 6


def test_every_prototype_is_mirrored(header):
    missing = sorted(set(header.functions) - set(_capi.PROTOTYPES))
    extra = sorted(set(_capi.PROTOTYPES) - set(header.functions))
    assert not missing, "MOEKIT_API functions without a prototype in moekit/_capi.py: %s" % missing
    assert not extra, "prototypes in moekit/_capi.py that no header declares: %s" % extra
    for name, f in header.functions.items():
        restype, args = _capi.PROTOTYPES[name]
        want_res = ctypes.c_int if f.result.base == "moekit_status_t" else expected_ctype(header, f.result)
        assert restype == want_res, "%s returns %s in C; _capi says %s" % (name, f.result, restype)
        assert [a for a, _ in args] == [p.name for p in f.params], "%s: argument names differ" % name
        for (arg, t), p in zip(args, f.params):
            assert t == expected_ctype(header, p.type), "%s(%s): C %s, _capi %s" % (name, arg, p.type, t)


def test_every_struct_is_mirrored(header):
    assert sorted(header.structs) == sorted(_capi.STRUCTS)
    for name, s in header.structs.items():
        mirror = _capi.STRUCTS[name]
        assert [f[0] for f in mirror._fields_] == [f.name for f in s.fields], name
        for (fname, t), f in zip(mirror._fields_, s.fields):
            assert t == expected_field_ctype(f.type), "%s.%s: C %s, _capi %s" % (name, fname, f.type, t)
    assert sorted(_capi.HANDLES) == sorted(header.handles)


def test_every_constant_is_mirrored(header):
    for name, value in header.constants.items():
        assert hasattr(_capi, name), "%s (= %d) is not in moekit/_capi.py" % (name, value)
        assert getattr(_capi, name) == value, name
    ours = {k for k in vars(_capi) if k.startswith("MOEKIT_")}
    extra = ours - set(header.constants) - {"MOEKIT_VERSION"}
    assert not extra, "constants in moekit/_capi.py that no header defines: %s" % sorted(extra)


def _compile_layout_program(header, include_dir, tmp_path):
    cc = os.environ.get("MOEKIT_TEST_CC", "cc")
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += ['#include "moekit/%s"' % h for h in sorted({s.header for s in header.structs.values()} |
                                                          {f.header for f in header.functions.values()})]
    lines.append("int main(void) {")
    for name, s in sorted(header.structs.items()):
        lines.append('  printf("size %s %%zu\\n", sizeof(%s));' % (name, name))
        for f in s.fields:
            lines.append('  printf("offset %s.%s %%zu\\n", offsetof(%s, %s));' % (name, f.name, name, f.name))
    for name in sorted(header.constants) + ["MOEKIT_VERSION"]:
        lines.append('  printf("const %s %%lld\\n", (long long)(%s));' % (name, name))
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    try:
        subprocess.run([cc, "-std=c99", "-I", include_dir, str(src), "-o", str(exe)], check=True,
                       capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no C compiler (%s) to print the C layout; set MOEKIT_TEST_CC" % cc)
    except subprocess.CalledProcessError as e:
        raise AssertionError("compiling the layout program failed:\n%s" % e.stderr)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        facts[(kind, key)] = int(value)
    return facts


def test_struct_layouts_match_the_c_compiler(header, include_dir, tmp_path):
    facts = _compile_layout_program(header, include_dir, tmp_path)
    for name, mirror in _capi.STRUCTS.items():
        assert ctypes.sizeof(mirror) == facts[("size", name)], "sizeof(%s)" % name
        for fname, _ in mirror._fields_:
            assert getattr(mirror, fname).offset == facts[("offset", "%s.%s" % (name, fname))], \
                "offsetof(%s, %s)" % (name, fname)
    for name in header.constants:
        assert getattr(_capi, name) == facts[("const", name)], "%s as the C compiler sees it" % name
    assert _capi.MOEKIT_VERSION == facts[("const", "MOEKIT_VERSION")]


CONFIGS = [(moekit.RouterConfig, "moekit_router_config_t"), (moekit.PlanConfig, "moekit_plan_config_t"),
           (moekit.ExpertsConfig, "moekit_experts_config_t"), (moekit.MlpConfig, "moekit_mlp_config_t"),
           (moekit.EpConfig, "moekit_ep_config_t"), (moekit.LayerConfig, "moekit_layer_config_t")]


@pytest.mark.parametrize("cls,cname", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_config_dataclass_has_the_struct_fields(header, cls, cname):
    fields = [f.name for f in header.structs[cname].fields]
    assert fields[0] == "struct_size"
    assert [f.name for f in dataclasses.fields(cls)] == fields[1:]
    assert cls._struct is _capi.STRUCTS[cname]


@pytest.mark.parametrize("cls,cname", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_config_dataclass_defaults_are_the_librarys(lib, cls, cname):
    ours = cls().to_c()
    theirs = cls._struct()
    _lib.call(cls._init, ctypes.byref(theirs), ctypes.sizeof(theirs))
    for fname, _ in cls._struct._fields_:
        assert getattr(ours, fname) == getattr(theirs, fname), "%s.%s default" % (cls.__name__, fname)
    assert theirs.struct_size == ctypes.sizeof(cls._struct)


ENUMS = [(_config.Dtype, "moekit_dtype_t"), (_config.ScoreFunc, "moekit_score_func_t"),
         (_config.SoftmaxOrder, "moekit_softmax_order_t"), (_config.GroupScore, "moekit_group_score_t"),
         (_config.GroupMask, "moekit_group_mask_t"), (_config.DropPolicy, "moekit_drop_policy_t"),
         (_config.Activation, "moekit_activation_t"), (_config.GateUpLayout, "moekit_gate_up_layout_t"),
         (_config.GemmPath, "moekit_gemm_path_t"),
         (_config.WeightLayout, "moekit_weight_layout_t"), (_config.EpMode, "moekit_ep_mode_t"),
         (_config.LayerStage, "moekit_layer_stage_t")]


def test_every_enum_has_an_intenum(header):
    covered = {c for _, c in ENUMS} | {"moekit_status_t"}
    assert sorted(set(header.enums) - covered) == [], "C enums without a Python IntEnum"


@pytest.mark.parametrize("cls,cname", ENUMS, ids=[c[1] for c in ENUMS])
def test_intenum_members_are_the_c_constants(header, cls, cname):
    values = header.enums[cname]
    prefix = os.path.commonprefix(list(values))
    prefix = prefix[:prefix.rfind("_") + 1]
    if len(values) == 1:
        prefix = "MOEKIT_"
    want = {k[len(prefix):]: v for k, v in values.items()}
    # Some C names repeat a word the prefix ate (MOEKIT_SOFTMAX_THEN_TOPK vs MOEKIT_TOPK_THEN_SOFTMAX).
    got = {m.name: int(m) for m in cls}
    assert sorted(got.values()) == sorted(want.values()), cname
    for name, value in got.items():
        full = [k for k, v in values.items() if v == value][0]
        assert full.endswith(name), "%s.%s = %d is %s in C" % (cls.__name__, name, value, full)


def test_every_failure_status_has_its_exception_class(header):
    for name, value in header.enums["moekit_status_t"].items():
        if value == 0:
            continue
        cls = _lib.error_class(value)
        assert cls is not _lib.MoekitError and issubclass(cls, _lib.MoekitError), name


def test_the_library_exports_every_prototype(lib):
    for name in _capi.PROTOTYPES:
        assert _lib.fn(name) is not None
