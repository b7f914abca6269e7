"""A small parser for moekit's public C headers (include/moekit/*.h), used by the tests that keep
the Python mirrors (moekit._capi) equal to the C API: every MOEKIT_API prototype, every struct's
fields in order, every enum constant and every integer #define.

The headers are plain C99 written in one style (house-style.md), so a tokenizer over the text
without a preprocessor is enough; anything it cannot read raises, so a new construct in a header
fails the test instead of being skipped.
"""
import glob
import os
import re
from collections import namedtuple

class CType(namedtuple("CType", "base base_const pointer_consts")):
    """A C type: `base` ("int32_t", "void", "moekit_router_config_t"), whether the base is const,
    and per pointer level (innermost first) whether that pointer itself is const-qualified:
    "const float*" = ("float", True, (False,)); "void* const*" = ("void", False, (True, False))."""

    @property
    def pointer(self):
        return len(self.pointer_consts)

    @property
    def const_pointee(self):
        """The outermost pointer points to const (const T*, T* const*)."""
        if not self.pointer_consts:
            return False
        return self.pointer_consts[-2] if len(self.pointer_consts) > 1 else self.base_const


Param = namedtuple("Param", "name type")
Function = namedtuple("Function", "name result params header")
Field = namedtuple("Field", "name type")
Struct = namedtuple("Struct", "name fields header")


def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def parse_type(text):
    """'const moekit_router_config_t*' -> CType('moekit_router_config_t', True, (False,))."""
    tokens = text.replace("*", " * ").split()
    base, base_const, pointers = None, False, []
    for tok in tokens:
        if tok == "*":
            if base is None:
                raise ValueError("cannot read type %r" % text)
            pointers.append(False)
        elif tok == "const":
            if pointers:
                pointers[-1] = True
            else:
                base_const = True
        elif tok in ("struct", "enum") and base is None:
            continue
        elif base is None:
            base = tok
        else:
            raise ValueError("cannot read type %r" % text)
    if base is None:
        raise ValueError("cannot read type %r" % text)
    return CType(base, base_const, tuple(pointers))


def _split_decl(decl):
    """'const float* aux_score_sum' -> ('aux_score_sum', CType(...))."""
    decl = " ".join(decl.split())
    m = re.match(r"^(.*?)([A-Za-z_]\w*)$", decl)
    if not m:
        raise ValueError("cannot read declaration %r" % decl)
    return m.group(2), parse_type(m.group(1))


class Header(object):
    def __init__(self, include_dir):
        self.functions = {}   # name -> Function
        self.structs = {}     # typedef name -> Struct
        self.enums = {}       # typedef name -> {constant: value}
        self.constants = {}   # every integer constant: enum values and #defines
        self.handles = {}     # typedef name -> struct tag of an opaque pointer typedef
        paths = sorted(glob.glob(os.path.join(include_dir, "moekit", "*.h")))
        if not paths:
            raise FileNotFoundError("no headers under %s/moekit" % include_dir)
        for path in paths:
            self._parse(path)

    def _parse(self, path):
        name = os.path.basename(path)
        raw = open(path).read()
        text = _strip_comments(raw)
        text = re.sub(r"\\\n", " ", text)
        for m in re.finditer(r"^\s*#define\s+(MOEKIT_\w+)[ \t]+([^\n]+)$", text, flags=re.M):
            value = m.group(2).strip()
            if re.match(r"^-?(0x[0-9a-fA-F]+|\d+)[uUlL]*$", value):
                self.constants[m.group(1)] = int(value.rstrip("uUlL"), 0)
        body = re.sub(r"^\s*#[^\n]*$", " ", text, flags=re.M)
        body = body.replace('extern "C" {', " ")
        for m in re.finditer(r"typedef\s+enum\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", body, flags=re.S):
            values, nxt = {}, 0
            for item in [i.strip() for i in m.group(2).split(",") if i.strip()]:
                if "=" in item:
                    k, v = [s.strip() for s in item.split("=", 1)]
                    nxt = int(v, 0)
                else:
                    k = item
                values[k] = nxt
                self.constants[k] = nxt
                nxt += 1
            self.enums[m.group(3)] = values
        for m in re.finditer(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", body, flags=re.S):
            fields = []
            for decl in [d.strip() for d in m.group(2).split(";") if d.strip()]:
                if "[" in decl or "(" in decl or "," in decl:
                    raise ValueError("%s: unsupported field declaration %r" % (name, decl))
                fname, ftype = _split_decl(decl)
                fields.append(Field(fname, ftype))
            self.structs[m.group(3)] = Struct(m.group(3), fields, name)
        for m in re.finditer(r"typedef\s+struct\s+(\w+)\s*\*\s*(\w+)\s*;", body):
            self.handles[m.group(2)] = m.group(1)
        for m in re.finditer(r"MOEKIT_API\s+([^;{]*?)\(([^)]*)\)\s*;", body, flags=re.S):
            fname, result = _split_decl(m.group(1))
            params = []
            args = " ".join(m.group(2).split())
            if args not in ("void", ""):
                for i, a in enumerate(args.split(",")):
                    pname, ptype = _split_decl(a.strip())
                    params.append(Param(pname, ptype))
            self.functions[fname] = Function(fname, result, params, name)
        # Every MOEKIT_API must have been read: a prototype the regex missed would escape the check.
        count = len(re.findall(r"\bMOEKIT_API\b", body))
        read = sum(1 for f in self.functions.values() if f.header == name)
        if count != read:
            raise ValueError("%s: %d MOEKIT_API declarations but %d parsed" % (name, count, read))
