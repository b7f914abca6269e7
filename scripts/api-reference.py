#!/usr/bin/env python3
"""Generates docs/api.md, the API reference of moekit, from the public C headers include/moekit/*.h.

    python3 scripts/api-reference.py            # writes docs/api.md
    python3 scripts/api-reference.py --check    # compares with docs/api.md; diff and exit 1 if stale
    python3 scripts/api-reference.py --output=FILE

The headers are the source of truth: their comments are copied word for word and only restructured
(a section per header, the header's top comment, then its enums, structs, opaque handles, macro
constants and functions; indented comment lines become code blocks, or lists when they describe the
function's parameters). Output is deterministic: fixed header order, source order inside a header,
nothing depends on the clock, the locale or the machine.

The headers are plain C99 in one style (house-style.md), so a tokenizer without a preprocessor is
enough. Anything the parser does not know (a declaration of another kind, a function-pointer field,
a define inside a conditional, a comment it cannot attach) stops it with the file and line, so a new
construct fails the api_reference test instead of vanishing from the reference. After rendering it
checks that every MOEKIT_API function of the headers has its section, and that the functions are
exactly the library's exported symbols (tests/abi/exported_symbols.txt).

Standard library only (runs in CI wherever python3 runs).
"""
import argparse
import difflib
import os
import re
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
INCLUDE_DIR = os.path.join("include", "moekit")
# Documentation order; moekit.h is the umbrella that includes all of them (checked).
HEADERS = ["status.h", "router.h", "tokens.h", "experts.h", "layer.h", "ep.h"]
UMBRELLA = "moekit.h"
OUTPUT = os.path.join("docs", "api.md")
EXPORTED_SYMBOLS = os.path.join("tests", "abi", "exported_symbols.txt")
PROTOTYPE_WIDTH = 100


class ParseError(Exception):
    pass


# ---- tokenizer ------------------------------------------------------------------------------------


class Tok(object):
    """kind: 'comment' (text = the whole /* */), 'pp' (a directive, continuations joined),
    'code' (one C token) or 'blank' (an empty line). own_line: a comment with nothing before it on
    its line."""

    def __init__(self, kind, text, line, end_line, own_line=False):
        self.kind, self.text, self.line, self.end_line, self.own_line = (
            kind, text, line, end_line, own_line)
        self.used = False

    def __repr__(self):
        return "%s %r at line %d" % (self.kind, self.text[:40], self.line)


_CODE_TOKEN = re.compile(r'[A-Za-z_]\w*|\d[\w.]*|"(?:[^"\\\n]|\\.)*"|\S')


def tokenize(text, where):
    toks = []
    i, n, line = 0, len(text), 1
    content = False  # the current line has something other than whitespace so far
    while i < n:
        c = text[i]
        if c == "\n":
            if not content:
                toks.append(Tok("blank", "", line, line))
            line += 1
            content = False
            i += 1
        elif c in " \t\r\f\v":
            i += 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ParseError("%s:%d: unterminated comment" % (where, line))
            body = text[i:j + 2]
            toks.append(Tok("comment", body, line, line + body.count("\n"), own_line=not content))
            line += body.count("\n")
            content = True
            i = j + 2
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            body = "/*" + text[i + 2:j] + " */"
            toks.append(Tok("comment", body, line, line, own_line=not content))
            content = True
            i = j
        elif c == "#" and not content:
            start, j = line, i
            while j < n and text[j] != "\n" and not text.startswith("/*", j) \
                    and not text.startswith("//", j):
                if text[j] == "\\" and j + 1 < n and text[j + 1] == "\n":
                    line += 1
                    j += 2
                    continue
                j += 1
            directive = " ".join(text[i:j].replace("\\\n", " ").split())
            toks.append(Tok("pp", directive, start, line))
            content = True
            i = j
        else:
            m = _CODE_TOKEN.match(text, i)
            toks.append(Tok("code", m.group(0), line, line))
            content = True
            i = m.end()
    return toks


# ---- comment text ---------------------------------------------------------------------------------


def comment_lines(body):
    """The lines of a /* */ comment without the delimiters and the ' * ' prefixes; indentation past
    the prefix is kept (it carries the formulas' and parameter lists' structure)."""
    assert body.startswith("/*") and body.endswith("*/")
    raw = body[2:-2].split("\n")
    out = []
    for k, ln in enumerate(raw):
        ln = ln.rstrip()
        if k == 0:
            ln = ln[1:] if ln.startswith(" ") else ln
        else:
            s = ln.lstrip()
            if s.startswith("*"):
                s = s[1:]
                ln = s[1:] if s.startswith(" ") else s
            else:
                ln = s  # a continuation without the ' * ' prefix (trailing field comments)
        out.append(ln)
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def comment_flat(body):
    """A comment as one line (for table cells)."""
    return " ".join(" ".join(comment_lines(body)).split())


# ---- model ----------------------------------------------------------------------------------------


class Item(object):
    def __init__(self, kind, name, line, doc):
        self.kind, self.name, self.line = kind, name, line
        self.doc = doc          # leading comments (Tok list), in order
        self.trailing = []      # comments on the line where the item ends
        self.end_line = line


class Header(object):
    def __init__(self, name):
        self.name = name
        self.top = None         # the top comment (Tok)
        self.includes = []
        self.enums = []         # Item with .tag, .values: [Item(value, text)]
        self.structs = []       # Item with .tag, .fields: [Item with .ctype] and notes
        self.handles = []       # Item with .tag
        self.define_groups = []  # (doc comments, [Item with .value, .params])
        self.functions = []     # Item with .result, .params: [(ctype, name)]


def ctype_text(tokens):
    out = ""
    for t in tokens:
        if t == "*":
            out += "*"
        else:
            out += (" " if out else "") + t
    return out


_C_TYPE_WORDS = {"const", "volatile", "struct", "enum", "unsigned", "signed", "void", "char",
                 "short", "int", "long", "float", "double"}


def split_declaration(tokens, where, what):
    """['const', 'float', '*', 'x'] -> ('const float*', 'x'). Refuses anything but 'type name'."""
    texts = [t.text for t in tokens]
    bad = [t for t in texts if t in ("[", "]", "(", ")", ",", "=", "{", "}")]
    if bad or len(texts) < 2:
        raise ParseError("%s: cannot read %s %r" % (where, what, " ".join(texts)))
    name = texts[-1]
    if not re.match(r"^[A-Za-z_]\w*$", name) or name in _C_TYPE_WORDS:
        raise ParseError("%s: %s %r has no name" % (where, what, " ".join(texts)))
    for t in texts[:-1]:
        if t != "*" and not re.match(r"^[A-Za-z_]\w*$", t):
            raise ParseError("%s: cannot read the type of %s %r" % (where, what, " ".join(texts)))
    return ctype_text(texts[:-1]), name


class Parser(object):
    def __init__(self, name, text):
        self.h = Header(name)
        self.where = name
        self.toks = tokenize(text, name)
        self.i = 0

    def fail(self, line, msg):
        raise ParseError("%s:%d: %s" % (self.where, line, msg))

    def parse(self):
        toks, h = self.toks, self.h
        firsts = [t for t in toks if t.kind != "blank"]
        if not firsts or firsts[0].kind != "comment":
            self.fail(1, "the header must start with its top comment")
        h.top = firsts[0]
        h.top.used = True
        pending = []            # own-line comments waiting for the next declaration
        cond = []               # preprocessor conditionals: 'guard', 'cplusplus', 'win32'
        guard = None
        last = None             # the last item (for trailing comments)
        last_kind = None        # 'define' when the previous top-level thing was a define
        blank_since = True
        i = 0
        while i < len(toks):
            t = toks[i]
            if t.kind == "blank":
                blank_since = True
                i += 1
                continue
            if t.kind == "comment":
                if t.used:
                    i += 1
                    continue
                if not t.own_line:
                    if last is not None and last.end_line == t.line:
                        last.trailing.append(t)
                        t.used = True
                        i += 1
                        continue
                    self.fail(t.line, "cannot attach the comment %r" % comment_flat(t.text)[:60])
                pending.append(t)
                t.used = True
                blank_since = False
                i += 1
                continue
            if t.kind == "pp":
                m = re.match(r"^#\s*(\w+)\s*(.*)$", t.text)
                if not m:
                    self.fail(t.line, "cannot read directive %r" % t.text)
                d, rest = m.group(1), m.group(2)
                if d == "ifndef" and guard is None:
                    guard = rest
                    cond.append("guard")
                    last = None
                elif d == "ifdef" and rest == "__cplusplus":
                    cond.append("cplusplus")
                    last = None
                elif d == "if" and rest == "defined(_WIN32)":
                    cond.append("win32")
                    last = None
                elif d == "else" and cond and cond[-1] == "win32":
                    cond[-1] = "win32-else"
                    last = Item("directive", "#else", t.line, [])
                elif d == "endif" and cond:
                    cond.pop()
                    # "#endif /* MOEKIT_X_H */": the guard's label, not documentation.
                    last = Item("directive", "#endif", t.line, [])
                elif d == "include":
                    mm = re.match(r'^"([\w/.]+)"$|^<([\w/.]+)>$', rest)
                    if not mm:
                        self.fail(t.line, "cannot read include %r" % rest)
                    if mm.group(1):
                        h.includes.append(mm.group(1))
                    last = None
                elif d == "define":
                    mm = re.match(r"^([A-Za-z_]\w*)(\([^)]*\))?(?:\s+(.*))?$", rest)
                    if not mm:
                        self.fail(t.line, "cannot read define %r" % rest)
                    name, params, value = mm.group(1), mm.group(2), (mm.group(3) or "").strip()
                    if name == guard and cond == ["guard"] and not value:
                        last = None
                    elif name == "MOEKIT_API" and cond and cond[-1] in ("win32", "win32-else"):
                        # The export attribute, not a constant; its two definitions are the only
                        # conditional code the headers have.
                        last = None
                        if pending:
                            self.fail(t.line, "a comment before MOEKIT_API has no place in the "
                                      "reference")
                    elif cond != ["guard"]:
                        self.fail(t.line, "define %s inside a conditional (%s): the reference "
                                  "cannot say when it applies" % (name, "/".join(cond)))
                    else:
                        if not value:
                            self.fail(t.line, "define %s has no value" % name)
                        item = Item("define", name, t.line, pending)
                        item.value, item.params = value, params
                        item.end_line = t.end_line
                        if last_kind == "define" and not pending and not blank_since:
                            h.define_groups[-1][1].append(item)
                        else:
                            h.define_groups.append((pending, [item]))
                        pending = []
                        last = item
                        last_kind = "define"
                        blank_since = False
                        i += 1
                        continue
                else:
                    self.fail(t.line, "unexpected directive %r" % t.text)
                if pending:
                    self.fail(pending[0].line, "the comment %r is followed by a directive, not a "
                              "declaration" % comment_flat(pending[0].text)[:60])
                last_kind = None
                blank_since = False
                i += 1
                continue
            # code
            if cond and cond[-1] == "cplusplus":
                words = [x.text for x in toks[i:i + 3]]
                if words == ["extern", '"C"', "{"]:
                    i += 3
                    continue
                if t.text == "}":
                    i += 1
                    continue
                self.fail(t.line, "unexpected code inside #ifdef __cplusplus: %r" % t.text)
            if cond != ["guard"]:
                self.fail(t.line, "declaration outside the include guard or inside a conditional")
            j, depth = i, 0
            while j < len(toks):
                x = toks[j]
                if x.kind == "pp":
                    self.fail(x.line, "directive inside a declaration")
                if x.kind == "code":
                    if x.text in "{(":
                        depth += 1
                    elif x.text in "})":
                        depth -= 1
                    elif x.text == ";" and depth == 0:
                        break
                j += 1
            if j >= len(toks):
                self.fail(t.line, "declaration without ';'")
            stmt = toks[i:j + 1]
            item = self.declaration(stmt, pending)
            pending = []
            item.end_line = toks[j].line
            last = item
            last_kind = item.kind
            blank_since = False
            i = j + 1
        if pending:
            self.fail(pending[0].line, "comment at the end of the header attached to nothing")
        if cond:
            self.fail(len(toks) and toks[-1].line or 1, "unterminated conditional %s" % cond)
        for t in toks:
            if t.kind == "comment" and not t.used:
                self.fail(t.line, "comment not placed in the reference")
        return h

    # -- declarations --

    def declaration(self, stmt, doc):
        code = [x for x in stmt if x.kind == "code"]
        words = [x.text for x in code]
        line = code[0].line
        if words[:2] == ["typedef", "enum"] and len(words) > 3 and words[3] == "{":
            return self.enum(stmt, doc)
        if words[:2] == ["typedef", "struct"] and len(words) > 3 and words[3] == "{":
            return self.struct(stmt, doc)
        if words[:2] == ["typedef", "struct"] and len(words) == 6 and words[3] == "*":
            if any(x.kind == "comment" for x in stmt):
                self.fail(line, "comment inside a handle typedef")
            item = Item("handle", words[4], line, doc)
            item.tag = words[2]
            self.h.handles.append(item)
            return item
        if words[0] == "MOEKIT_API":
            return self.function(stmt, doc)
        self.fail(line, "cannot read declaration %r" % " ".join(words)[:80])

    def body(self, stmt, sep):
        """Splits a braced body into entries: (code tokens, leading comments, trailing comments).
        Returns (tag, entries, typedef name)."""
        code = [x for x in stmt if x.kind == "code"]
        tag = code[2].text
        if code[-1].text != ";" or code[-3].text != "}":
            self.fail(code[0].line, "cannot read the end of %s" % tag)
        name = code[-2].text
        start = stmt.index(code[3]) + 1
        end = stmt.index(code[-3])
        entries, cur, lead, cur_trailing = [], [], [], []
        last_end = None  # (entry, line of its separator or last token)
        for x in stmt[start:end]:
            if x.kind == "blank":
                continue
            if x.kind == "comment":
                x.used = True
                if not x.own_line:
                    if cur and cur[-1].line == x.line:
                        pass  # trailing of the entry being read (last enumerator, no comma)
                    elif last_end is not None and last_end[1] == x.line and not cur:
                        last_end[0][2].append(x)
                        continue
                    else:
                        self.fail(x.line, "cannot attach the comment %r in %s"
                                  % (comment_flat(x.text)[:60], tag))
                    if cur:
                        cur_trailing.append(x)
                        continue
                if cur:
                    self.fail(x.line, "comment in the middle of an entry of %s" % tag)
                lead.append(x)
                continue
            if x.kind != "code":
                self.fail(x.line, "directive inside %s" % tag)
            if x.text == sep:
                if not cur:
                    self.fail(x.line, "empty entry in %s" % tag)
                entry = (cur, lead, cur_trailing)
                entries.append(entry)
                last_end = (entry, x.line)
                cur, lead, cur_trailing = [], [], []
                continue
            cur.append(x)
        if cur:
            if sep == ";":
                self.fail(cur[0].line, "field without ';' in %s" % tag)
            entries.append((cur, lead, cur_trailing))
            lead = []
        if lead:
            self.fail(lead[0].line, "comment at the end of %s attached to nothing" % tag)
        return tag, entries, name

    def enum(self, stmt, doc):
        tag, entries, name = self.body(stmt, ",")
        item = Item("enum", name, stmt[0].line, doc)
        item.tag, item.values = tag, []
        nxt = 0
        for cur, lead, trailing in entries:
            words = [x.text for x in cur]
            if not re.match(r"^[A-Za-z_]\w*$", words[0]) or (len(words) > 1 and words[1] != "="):
                self.fail(cur[0].line, "cannot read enumerator %r" % " ".join(words))
            if len(words) > 1:
                text = " ".join(words[2:])
                if re.match(r"^-?(0x[0-9a-fA-F]+|\d+)$", text.replace(" ", "")):
                    nxt = int(text.replace(" ", ""), 0)
                    value = str(nxt)
                else:
                    value, nxt = text, None
            else:
                if nxt is None:
                    self.fail(cur[0].line, "enumerator %s follows a non-literal value" % words[0])
                value = str(nxt)
            v = Item("enumerator", words[0], cur[0].line, lead)
            v.value, v.trailing = value, trailing
            item.values.append(v)
            nxt = None if nxt is None else nxt + 1
        self.h.enums.append(item)
        return item

    def struct(self, stmt, doc):
        tag, entries, name = self.body(stmt, ";")
        item = Item("struct", name, stmt[0].line, doc)
        item.tag, item.fields = tag, []
        for cur, lead, trailing in entries:
            ctype, fname = split_declaration(cur, "%s:%d" % (self.where, cur[0].line),
                                            "a field of %s" % name)
            f = Item("field", fname, cur[0].line, lead)
            f.ctype, f.trailing = ctype, trailing
            item.fields.append(f)
        if not item.fields:
            self.fail(stmt[0].line, "struct %s has no fields" % name)
        self.h.structs.append(item)
        return item

    def function(self, stmt, doc):
        line = stmt[0].line
        if any(x.kind == "comment" for x in stmt):
            self.fail(line, "comment inside a prototype")
        code = [x for x in stmt if x.kind == "code"]
        words = [x.text for x in code]
        if "(" not in words or words[-2:] != [")", ";"]:
            self.fail(line, "cannot read prototype %r" % " ".join(words)[:80])
        lp = words.index("(")
        if words.count("(") != 1 or words.count(")") != 1:
            self.fail(line, "function-pointer or nested parentheses in %r" % " ".join(words)[:80])
        result, name = split_declaration(code[1:lp], "%s:%d" % (self.where, line),
                                         "a function")
        params = []
        inner = code[lp + 1:-2]
        if [x.text for x in inner] != ["void"]:
            if not inner:
                self.fail(line, "%s(): write (void)" % name)
            group = []
            for x in inner + [None]:
                if x is None or x.text == ",":
                    params.append(split_declaration(group, "%s:%d" % (self.where, line),
                                                    "a parameter of %s" % name))
                    group = []
                else:
                    group.append(x)
        if not doc:
            self.fail(line, "%s has no doc comment" % name)
        item = Item("function", name, line, doc)
        item.result, item.params = result, params
        self.h.functions.append(item)
        return item


# ---- markdown -------------------------------------------------------------------------------------


def slug(text):
    """GitHub's heading anchor."""
    s = text.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


class Links(object):
    def __init__(self):
        self.anchor = {}     # identifier -> anchor (functions, enums, structs, handles)
        self.code = set()    # identifiers shown as code (constants, enumerators)


_IDENT = re.compile(r"\b(?:moekit|MOEKIT)_\w+")


def escape_text(s, table):
    """Escapes what markdown would read as markup in comment prose."""
    s = s.replace("\\", "\\\\").replace("*", "\\*").replace("~", "\\~")
    s = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    s = re.sub(r"&(?=#?\w+;)", "&amp;", s)
    s = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s)
    s = s.replace("`", "\\`")
    if table:
        s = s.replace("|", "\\|")
    return s


def inline(s, links, table=False, self_name=None, statuses=()):
    """Comment prose -> markdown: backtick spans kept, moekit identifiers as code (functions and
    types linked to their sections), the rest escaped."""
    out = []
    for k, part in enumerate(re.split(r"(`[^`\n]+`)", s)):
        if k % 2:
            out.append(part.replace("|", "\\|") if table else part)
            continue
        pos = 0
        pattern = _IDENT if not statuses else re.compile(
            r"\b(?:moekit|MOEKIT)_\w+|\b(?:%s)\b" % "|".join(statuses))
        for m in pattern.finditer(part):
            out.append(escape_text(part[pos:m.start()], table))
            name = m.group(0)
            if name in links.anchor and name != self_name:
                out.append("[`%s`](#%s)" % (name, links.anchor[name]))
            else:
                out.append("`%s`" % name)
            pos = m.end()
        out.append(escape_text(part[pos:], table))
    return "".join(out)


def escape_line_start(s):
    """A paragraph line must not start a heading, quote, list or setext underline."""
    m = re.match(r"^(\d+)([.)])(\s|$)", s)
    if m:
        return m.group(1) + "\\" + s[len(m.group(1)):]
    if re.match(r"^(#|>|[-+](\s|$)|=+\s*$|-+\s*$)", s):
        return "\\" + s
    return s


_LABEL = re.compile(r"^[A-Z][A-Za-z0-9 \-/']{0,40}:\s")


def code_block(lines):
    indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
    body = [x[indent:] if x.strip() else "" for x in lines]
    if any(x.lstrip().startswith("```") for x in body):
        raise ParseError("a comment line starts with ``` and cannot go into a code block")
    return ["```text"] + body + ["```"]


def param_item(text, params, after_param):
    """'name [in, device] ...', 'a, b: ...' -> the names, or None for a formula or prose line.
    'name >= E, ...' describes a parameter inside a parameter list (after_param) and is a formula
    elsewhere ('noise == 0: w = ...')."""
    m = re.match(r"^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)(.*)$", text)
    if not m:
        return None
    names = [x.strip() for x in m.group(1).split(",")]
    if not all(x in params for x in names):
        return None
    rest = m.group(2)
    if rest == "" or rest.startswith(":"):
        return names
    if rest[0] in " \t" and (after_param or rest.lstrip()[:1] not in tuple("=<>!+-*/^|&%")):
        return names
    return None


def render_block(lines, links, params, self_name, statuses):
    """An indented run of comment lines: a list where the items describe parameters, code blocks
    (formulas, aligned tables) elsewhere."""
    indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
    items = []  # [first line, continuation lines]
    for ln in lines:
        if ln.strip() and len(ln) - len(ln.lstrip()) == indent or not items:
            items.append([ln])
        else:
            items[-1].append(ln)
    runs = []   # ('list', [(names, text)]) or ('code', [lines])
    for it in items:
        first = it[0].strip()
        names = param_item(first, params, bool(runs) and runs[-1][0] == "list") \
            if params else None
        text = " ".join(" ".join(x.strip() for x in it).split())
        if names is not None:
            if runs and runs[-1][0] == "list":
                runs[-1][1].append((names, text))
            else:
                runs.append(("list", [(names, text)]))
            continue
        if runs and runs[-1][0] == "list":
            prev_names, prev_text = runs[-1][1][-1]
            if not prev_text.endswith("."):
                # the parameter's description wrapped to the item's own indentation
                runs[-1][1][-1] = (prev_names, prev_text + " " + text)
                continue
            if first[:1].islower() and "=" not in first:
                runs[-1][1].append(([], text))  # a plain line among the parameters
                continue
        if runs and runs[-1][0] == "code":
            runs[-1][1].extend(it)
        else:
            runs.append(("code", list(it)))
    out = []
    for kind, body in runs:
        if out:
            out.append("")
        if kind == "code":
            out.extend(code_block(body))
            continue
        for names, text in body:
            if names:
                m = re.match(r"^[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*(.*)$", text)
                rest = m.group(1).strip()
                head = ", ".join("`%s`" % x for x in names)
                if rest.startswith(":"):
                    head, rest = head + ":", rest[1:].strip()
                out.append("- %s %s" % (head, inline(rest, links, False, self_name, statuses))
                           if rest else "- " + head)
            else:
                out.append("- " + inline(text, links, False, self_name, statuses))
    return out


def render_doc(lines, links, params=None, self_name=None, statuses=()):
    """Comment lines -> markdown lines: prose paragraphs (a blank comment line, a 'Label:' line or
    a 'Returns' line starts a new one) and indented runs as lists or code blocks."""
    out, para, block = [], [], []

    def flush_para():
        if para:
            if out:
                out.append("")
            out.extend(escape_line_start(inline(ln, links, False, self_name, statuses))
                       for ln in para)
            del para[:]

    def flush_block():
        if block:
            if out:
                out.append("")
            out.extend(render_block(block, links, params, self_name, statuses))
            del block[:]

    for ln in lines:
        if not ln.strip():
            flush_para()
            flush_block()
        elif ln.startswith(" "):
            flush_para()
            block.append(ln)
        else:
            flush_block()
            if para and (_LABEL.match(ln) or ln.startswith("Returns ")):
                flush_para()
            para.append(ln.strip())
    flush_para()
    flush_block()
    return out


def format_prototype(fn):
    params = ["%s %s" % (t, n) for t, n in fn.params] or ["void"]
    one = "%s %s(%s);" % (fn.result, fn.name, ", ".join(params))
    if len(one) <= PROTOTYPE_WIDTH:
        return [one]
    return ["%s %s(" % (fn.result, fn.name)] + \
        ["    %s%s" % (p, "," if k + 1 < len(params) else ");") for k, p in enumerate(params)]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c if c else " " for c in r) + " |")
    return out


def docs_of(comments, links, params=None, self_name=None, statuses=()):
    out = []
    for c in comments:
        if out:
            out.append("")
        out.extend(render_doc(comment_lines(c.text), links, params, self_name, statuses))
    return out


def cell(comments, links, self_name=None):
    return " ".join(inline(comment_flat(c.text), links, True, self_name) for c in comments)


def render(headers, umbrella):
    links = Links()
    for h in headers:
        for it in h.enums + h.structs + h.handles + h.functions:
            if it.name in links.anchor:
                raise ParseError("%s is declared twice" % it.name)
            links.anchor[it.name] = slug(it.name)
    statuses = []
    for h in headers:
        for e in h.enums:
            if e.name == "moekit_status_t":
                statuses = [v.name[len("MOEKIT_STATUS_"):] for v in e.values]
    if not statuses:
        raise ParseError("moekit_status_t not found")

    out = ["# moekit API reference", "",
           "Generated by `scripts/api-reference.py` from the comments of the public headers "
           "`include/moekit/*.h`, which are the source of truth; do not edit this file by hand. "
           "Regenerate it with `python3 scripts/api-reference.py`; the `api_reference` test "
           "(`meson test api_reference`) fails when it is stale.",
           "",
           "Status names written without their `MOEKIT_STATUS_` prefix (`INVALID_ARGUMENT`) are "
           "the values of [`moekit_status_t`](#moekit_status_t).",
           "", "## Contents", ""]
    out.append("- [`moekit/%s`](#%s): the umbrella header" % (UMBRELLA, slug("moekit/" + UMBRELLA)))
    for h in headers:
        out.append("- [`moekit/%s`](#%s)" % (h.name, slug("moekit/" + h.name)))
        types = h.enums + h.structs + h.handles
        types.sort(key=lambda x: x.line)
        if types:
            out.append("  - types: " + ", ".join("[`%s`](#%s)" % (t.name, links.anchor[t.name])
                                                 for t in types))
        for f in h.functions:
            out.append("  - [`%s`](#%s)" % (f.name, links.anchor[f.name]))
    out.append("")

    out += ["## `moekit/%s`" % UMBRELLA, ""]
    out += render_doc(comment_lines(umbrella.top.text), links)
    out += ["", "```c"] + ['#include "%s"' % x for x in umbrella.includes] + ["```", ""]

    for h in headers:
        out += ["## `moekit/%s`" % h.name, ""]
        if h.includes:
            out += ["Includes " + ", ".join("`%s`" % x for x in h.includes) + ".", ""]
        out += render_doc(comment_lines(h.top.text), links)
        out.append("")
        if h.enums:
            out += ["### Enums in `%s`" % h.name, ""]
            for e in h.enums:
                out += ["#### `%s`" % e.name, ""]
                out += ["`typedef enum %s { ... } %s;`" % (e.tag, e.name), ""]
                if e.doc:
                    out += docs_of(e.doc, links, self_name=e.name) + [""]
                rows = [["`%s`" % v.name, "`%s`" % v.value, cell(v.doc + v.trailing, links)]
                        for v in e.values]
                out += table(["Constant", "Value", "Meaning"], rows) + [""]
        if h.structs or h.handles:
            out += ["### Types in `%s`" % h.name, ""]
            decls = sorted(h.structs + h.handles, key=lambda x: x.line)
            for s in decls:
                out += ["#### `%s`" % s.name, ""]
                if s.kind == "handle":
                    out += ["```c", "typedef struct %s* %s;" % (s.tag, s.name), "```", ""]
                    out += ["An opaque handle."]
                    if s.doc:
                        out += [""] + docs_of(s.doc, links, self_name=s.name)
                    out.append("")
                    continue
                out += ["`typedef struct %s { ... } %s;`" % (s.tag, s.name), ""]
                if s.doc:
                    out += docs_of(s.doc, links, self_name=s.name) + [""]
                rows = []
                for f in s.fields:
                    if f.doc:
                        if rows:
                            out += table(["Field", "Type", "Meaning"], rows) + [""]
                            rows = []
                        out += docs_of(f.doc, links, self_name=s.name) + [""]
                    rows.append(["`%s`" % f.name, "`%s`" % f.ctype,
                                 cell(f.trailing, links, s.name)])
                out += table(["Field", "Type", "Meaning"], rows) + [""]
        if h.define_groups:
            out += ["### Macro constants in `%s`" % h.name, ""]
            for doc, defines in h.define_groups:
                if doc:
                    out += docs_of(doc, links) + [""]
                rows = [["`%s%s`" % (d.name, d.params or ""), "`%s`" % d.value,
                         cell(d.trailing, links)] for d in defines]
                out += table(["Macro", "Value", "Meaning"], rows) + [""]
        if h.functions:
            out += ["### Functions in `%s`" % h.name, ""]
            for f in h.functions:
                out += ["#### `%s`" % f.name, "", "```c"] + format_prototype(f) + ["```", ""]
                since = re.findall(r"\bSince (\d+\.\d+)\.",
                                   " ".join(comment_flat(c.text) for c in f.doc))
                if len(since) != 1:
                    raise ParseError("%s: %s says 'Since X.Y.' %d times (once expected)"
                                     % (h.name, f.name, len(since)))
                # The version closes the comment: give it its own line.
                params = set(n for _, n in f.params)
                last = comment_lines(f.doc[-1].text)
                m = re.match(r"^(.*?)\s*\bSince \d+\.\d+\.$", last[-1])
                if m:
                    last[-1] = m.group(1)
                    if not last[-1].strip():
                        last.pop()
                for c in f.doc[:-1]:
                    out += render_doc(comment_lines(c.text), links, params, f.name, statuses)
                    out.append("")
                out += render_doc(last, links, params, f.name, statuses)
                out += ["", "Since %s." % since[0] if m else "", ""]
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


# ---- checks and main ------------------------------------------------------------------------------


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load(repo):
    inc = os.path.join(repo, INCLUDE_DIR)
    present = sorted(x for x in os.listdir(inc) if x.endswith(".h"))
    if present != sorted(HEADERS + [UMBRELLA]):
        raise ParseError("%s holds %s; this script documents %s (update HEADERS)"
                         % (INCLUDE_DIR, present, sorted(HEADERS + [UMBRELLA])))
    umbrella = Parser(UMBRELLA, read(os.path.join(inc, UMBRELLA))).parse()
    if umbrella.includes != ["moekit/" + x for x in HEADERS]:
        raise ParseError("%s includes %s, expected %s in that order"
                         % (UMBRELLA, umbrella.includes, ["moekit/" + x for x in HEADERS]))
    if umbrella.enums or umbrella.structs or umbrella.handles or umbrella.functions or \
            umbrella.define_groups:
        raise ParseError("%s declares something; the reference expects an umbrella only" % UMBRELLA)
    headers = []
    for name in HEADERS:
        text = read(os.path.join(inc, name))
        h = Parser(name, text).parse()
        # Every MOEKIT_API outside comments and directives must be a parsed function.
        code = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
        code = re.sub(r"//[^\n]*", " ", code)
        code = re.sub(r"^\s*#(?:[^\n]*\\\n)*[^\n]*", " ", code, flags=re.M)
        count = len(re.findall(r"\bMOEKIT_API\b", code))
        if count != len(h.functions):
            raise ParseError("%s: %d MOEKIT_API declarations but %d functions parsed"
                             % (name, count, len(h.functions)))
        headers.append(h)
    return headers, umbrella


def check_output(md, headers, repo):
    names = [f.name for h in headers for f in h.functions]
    for h in headers:
        for f in h.functions:
            if ("#### `%s`\n" % f.name) not in md or ("](#%s)" % slug(f.name)) not in md:
                raise ParseError("%s is missing from the reference or its contents" % f.name)
        for it in h.enums + h.structs + h.handles:
            if ("#### `%s`\n" % it.name) not in md:
                raise ParseError("%s is missing from the reference" % it.name)
        for e in h.enums:
            for v in e.values:
                if "| `%s` |" % v.name not in md:
                    raise ParseError("%s is missing from the reference" % v.name)
        for _, defines in h.define_groups:
            for d in defines:
                if "| `%s" % d.name not in md:
                    raise ParseError("%s is missing from the reference" % d.name)
    # The functions of the headers are exactly the symbols the library exports (the
    # exported_symbols test checks the library against the same list), none twice.
    exported = [x.strip() for x in read(os.path.join(repo, EXPORTED_SYMBOLS)).splitlines()
                if x.strip()]
    if len(set(names)) != len(names):
        raise ParseError("a function is declared twice")
    if sorted(names) != sorted(exported):
        raise ParseError("header functions and %s differ: only in headers %s, only exported %s"
                         % (EXPORTED_SYMBOLS, sorted(set(names) - set(exported)),
                            sorted(set(exported) - set(names))))


def generate(repo):
    headers, umbrella = load(repo)
    md = render(headers, umbrella)
    check_output(md, headers, repo)
    return md


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with the committed file instead of writing it")
    ap.add_argument("--output", default=None, help="default: <repo>/%s" % OUTPUT)
    ap.add_argument("--repo", default=REPO, help="repository root (default: this script's)")
    args = ap.parse_args(argv)
    output = args.output or os.path.join(args.repo, OUTPUT)
    try:
        md = generate(args.repo)
    except (ParseError, OSError) as e:
        print("api-reference.py: error: %s" % e, file=sys.stderr)
        return 2
    if args.check:
        try:
            old = read(output)
        except OSError:
            old = ""
        if old == md:
            print("%s is up to date (%d lines)" % (output, md.count("\n")))
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            old.splitlines(True), md.splitlines(True), fromfile=output,
            tofile="generated from include/moekit"))
        print("%s is stale: run python3 scripts/api-reference.py and commit it" % output)
        return 1
    with open(output, "w", encoding="utf-8", newline="\n") as f:
        f.write(md)
    print("wrote %s (%d lines)" % (output, md.count("\n")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
