//! Keeps src/lib.rs equal to the C headers (include/moekit/*.h, or MOEKIT_INCLUDE_DIR):
//!  - every MOEKIT_API prototype has an extern "C" declaration with the same argument names and the
//!    Rust types the mapping below gives (and no declaration lacks a prototype);
//!  - every struct has a #[repr(C)] mirror with the same fields, in order, of the mapped types;
//!  - every enum constant and integer #define has a `pub const` of the same value (enum constants
//!    typed with their enum's alias), every enum typedef a `c_int` alias, every opaque handle a
//!    pointer alias to a zero-sized struct;
//!  - every struct's size and field offsets equal what a C compiler prints for the headers (when a
//!    C compiler is available: $CC or cc), and so do the constants, MOEKIT_VERSION included.
//!
//! Adding a function, a field or a constant to a header without mirroring it fails this test.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// A small C parser for the headers' one style (C99, no macros but constants).

#[derive(Clone, Debug, PartialEq)]
struct CType {
    base: String,
    base_const: bool,
    /// Per pointer level, innermost first: whether that pointer itself is const.
    pointer_consts: Vec<bool>,
}

#[derive(Debug)]
struct CFunction {
    result: CType,
    params: Vec<(String, CType)>,
}

#[derive(Default, Debug)]
struct Header {
    functions: BTreeMap<String, CFunction>,
    structs: BTreeMap<String, Vec<(String, CType)>>,
    enums: BTreeMap<String, Vec<(String, i64)>>,
    constants: BTreeMap<String, i64>,
    handles: BTreeMap<String, String>,
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            let end = text[i + 2..].find("*/").expect("unterminated comment") + i + 4;
            out.push(' ');
            i = end;
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out.replace("\\\n", " ")
}

fn parse_int(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches(|c| "uUlL".contains(c));
    if let Some(hex) = s.strip_prefix("0x") {
        i64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn parse_type(text: &str) -> CType {
    let spaced = text.replace('*', " * ");
    let mut t = CType { base: String::new(), base_const: false, pointer_consts: Vec::new() };
    for tok in spaced.split_whitespace() {
        match tok {
            "*" => {
                assert!(!t.base.is_empty(), "cannot read type {text:?}");
                t.pointer_consts.push(false);
            }
            "const" => match t.pointer_consts.last_mut() {
                Some(last) => *last = true,
                None => t.base_const = true,
            },
            "struct" | "enum" if t.base.is_empty() => {}
            _ => {
                assert!(t.base.is_empty(), "cannot read type {text:?}");
                t.base = tok.to_string();
            }
        }
    }
    assert!(!t.base.is_empty(), "cannot read type {text:?}");
    t
}

/// "const float* aux_score_sum" -> ("aux_score_sum", const float*).
fn split_decl(decl: &str) -> (String, CType) {
    let decl = decl.trim();
    let at = decl.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).expect("declaration without a type");
    (decl[at + 1..].to_string(), parse_type(&decl[..=at]))
}

/// The text between `open` at `from` and its matching close.
fn balanced(text: &str, from: usize, open: char, close: char) -> (usize, usize) {
    let start = text[from..].find(open).unwrap() + from;
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return (start + 1, start + i);
            }
        }
    }
    panic!("unbalanced {open}{close}");
}

fn parse_header_file(h: &mut Header, text: &str) {
    let text = strip_comments(text);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 3 && words[0] == "#define" && words[1].starts_with("MOEKIT_") {
            if let Some(v) = parse_int(&words[2..].join(" ")) {
                h.constants.insert(words[1].to_string(), v);
            }
        }
    }
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("extern \"C\" {", " ");
    let mut pos = 0;
    while let Some(found) = body[pos..].find("typedef ") {
        let at = pos + found;
        let rest = &body[at + 8..];
        let kind = rest.split_whitespace().next().unwrap();
        let semi = at + body[at..].find(';').unwrap();
        if (kind == "enum" || kind == "struct") && body[at..semi].contains('{') {
            let (b0, b1) = balanced(&body, at, '{', '}');
            let end = b1 + body[b1..].find(';').unwrap();
            let name = body[b1 + 1..end].trim().to_string();
            if kind == "enum" {
                let mut values = Vec::new();
                let mut next = 0;
                for item in body[b0..b1].split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (k, v) = match item.split_once('=') {
                        Some((k, v)) => (k.trim(), parse_int(v).expect("enum value")),
                        None => (item, next),
                    };
                    values.push((k.to_string(), v));
                    h.constants.insert(k.to_string(), v);
                    next = v + 1;
                }
                h.enums.insert(name, values);
            } else {
                let fields = body[b0..b1]
                    .split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|d| {
                        assert!(!d.contains(['[', '(', ',']), "unsupported field declaration {d:?}");
                        split_decl(d)
                    })
                    .collect();
                h.structs.insert(name, fields);
            }
            pos = end;
        } else {
            // typedef struct tag* name_t;  (an opaque handle)
            let decl = body[at + 8..semi].trim();
            if let Some(rest) = decl.strip_prefix("struct ") {
                let (tag, name) = rest.split_once('*').expect("unsupported typedef");
                h.handles.insert(name.trim().to_string(), tag.trim().to_string());
            } else {
                panic!("unsupported typedef {decl:?}");
            }
            pos = semi;
        }
    }
    let mut count = 0;
    let mut pos = 0;
    while let Some(found) = body[pos..].find("MOEKIT_API") {
        let at = pos + found + "MOEKIT_API".len();
        let (a0, a1) = balanced(&body, at, '(', ')');
        let (name, result) = split_decl(&body[at..a0 - 1]);
        let args = body[a0..a1].split_whitespace().collect::<Vec<_>>().join(" ");
        let params =
            if args == "void" || args.is_empty() { Vec::new() } else { args.split(',').map(split_decl).collect() };
        h.functions.insert(name, CFunction { result, params });
        count += 1;
        pos = a1;
    }
    assert_eq!(count, body.matches("MOEKIT_API").count());
}

fn include_dir() -> PathBuf {
    match std::env::var("MOEKIT_INCLUDE_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../include"),
    }
}

fn header_files() -> Vec<PathBuf> {
    let dir = include_dir().join("moekit");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    files.sort();
    files
}

fn parse_headers() -> Header {
    let mut h = Header::default();
    for f in header_files() {
        parse_header_file(&mut h, &fs::read_to_string(&f).unwrap());
    }
    assert!(h.functions.len() >= 50, "the headers were not read");
    h
}

// ---------------------------------------------------------------------------------------------
// The mapping C -> Rust, and a reader for this crate's own declarations.

fn rust_type(t: &CType) -> String {
    let mut s = match t.base.as_str() {
        "int32_t" => "i32",
        "int64_t" => "i64",
        "uint64_t" => "u64",
        "uint8_t" => "u8",
        "size_t" => "usize",
        "float" => "f32",
        "char" => "c_char",
        "void" => "c_void",
        "int" => "c_int",
        other => other,
    }
    .to_string();
    let mut pointee_const = t.base_const;
    for &pointer_const in &t.pointer_consts {
        s = format!("*{} {}", if pointee_const { "const" } else { "mut" }, s);
        pointee_const = pointer_const;
    }
    s
}

/// (argument name, type) pairs and the result type of one extern declaration.
type RustSignature = (Vec<(String, String)>, Option<String>);

#[derive(Default, Debug)]
struct RustDecls {
    functions: BTreeMap<String, RustSignature>,
    structs: BTreeMap<String, Vec<(String, String)>>,
    consts: BTreeMap<String, (String, String)>,
    types: BTreeMap<String, String>,
}

fn norm(ty: &str) -> String {
    ty.split_whitespace().collect::<Vec<_>>().join(" ").replace("core::ffi::", "")
}

fn parse_rust(src: &str) -> RustDecls {
    let text: String =
        strip_comments(src).lines().filter(|l| !l.trim_start().starts_with("#")).collect::<Vec<_>>().join("\n");
    let mut d = RustDecls::default();
    let mut pos = 0;
    while let Some(found) = text[pos..].find("pub ") {
        let at = pos + found + 4;
        let rest = &text[at..];
        if let Some(r) = rest.strip_prefix("fn ") {
            let (a0, a1) = balanced(&text, at, '(', ')');
            let name = r[..r.find('(').unwrap()].trim().to_string();
            let args = text[a0..a1]
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|a| {
                    let (n, t) = a.split_once(':').expect("argument without a type");
                    (n.trim().to_string(), norm(t))
                })
                .collect();
            let end = a1 + text[a1..].find(';').unwrap();
            let ret = text[a1 + 1..end].trim();
            let ret = ret.strip_prefix("->").map(norm);
            d.functions.insert(name, (args, ret));
            pos = end;
        } else if let Some(r) = rest.strip_prefix("struct ") {
            let name = r[..r.find(|c: char| c == '{' || c.is_whitespace()).unwrap()].to_string();
            let (b0, b1) = balanced(&text, at, '{', '}');
            let fields = text[b0..b1]
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .filter_map(|f| f.strip_prefix("pub "))
                .map(|f| {
                    let (n, t) = f.split_once(':').unwrap();
                    (n.trim().to_string(), norm(t))
                })
                .collect();
            d.structs.insert(name, fields);
            pos = b1;
        } else if let Some(r) = rest.strip_prefix("const ") {
            let end = at + rest.find(';').unwrap();
            let (name, rest) = r[..end - at - 6].split_once(':').unwrap();
            let (ty, value) = rest.split_once('=').unwrap();
            d.consts.insert(name.trim().to_string(), (norm(ty), norm(value)));
            pos = end;
        } else if let Some(r) = rest.strip_prefix("type ") {
            let end = at + rest.find(';').unwrap();
            let (name, ty) = r[..end - at - 5].split_once('=').unwrap();
            d.types.insert(name.trim().to_string(), norm(ty));
            pos = end;
        } else {
            pos = at; // `pub use ...` and the like
        }
    }
    d
}

fn rust_decls() -> RustDecls {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    parse_rust(&fs::read_to_string(path).unwrap())
}

// ---------------------------------------------------------------------------------------------
// The checks.

#[test]
fn every_prototype_is_declared_with_the_mapped_types() {
    let h = parse_headers();
    let r = rust_decls();
    let c_names: BTreeSet<_> = h.functions.keys().cloned().collect();
    let rust_names: BTreeSet<_> = r.functions.keys().cloned().collect();
    let missing: Vec<_> = c_names.difference(&rust_names).collect();
    let extra: Vec<_> = rust_names.difference(&c_names).collect();
    assert!(missing.is_empty(), "MOEKIT_API functions not declared in src/lib.rs: {missing:?}");
    assert!(extra.is_empty(), "declarations in src/lib.rs that no header has: {extra:?}");
    for (name, f) in &h.functions {
        let (args, ret) = &r.functions[name];
        let want: Vec<(String, String)> = f.params.iter().map(|(n, t)| (n.clone(), rust_type(t))).collect();
        assert_eq!(args, &want, "arguments of {name}");
        let want_ret = if f.result.base == "void" && f.result.pointer_consts.is_empty() {
            None
        } else {
            Some(rust_type(&f.result))
        };
        assert_eq!(ret, &want_ret, "result of {name}");
    }
}

#[test]
fn every_struct_is_mirrored_field_by_field() {
    let h = parse_headers();
    let r = rust_decls();
    for (name, fields) in &h.structs {
        let got = r.structs.get(name).unwrap_or_else(|| panic!("struct {name} is not in src/lib.rs"));
        let want: Vec<(String, String)> = fields.iter().map(|(n, t)| (n.clone(), rust_type(t))).collect();
        assert_eq!(got, &want, "fields of {name}");
    }
    for (handle, tag) in &h.handles {
        assert_eq!(r.types.get(handle), Some(&format!("*mut {tag}")), "handle typedef {handle}");
        assert_eq!(r.structs.get(tag), Some(&Vec::new()), "opaque struct {tag} (a private zero-sized field)");
    }
    let known: BTreeSet<_> = h.structs.keys().chain(h.handles.values()).cloned().collect();
    let extra: Vec<_> = r.structs.keys().filter(|s| !known.contains(*s)).collect();
    assert!(extra.is_empty(), "structs in src/lib.rs that no header has: {extra:?}");
}

#[test]
fn every_constant_and_enum_is_mirrored() {
    let h = parse_headers();
    let r = rust_decls();
    let mut enum_of = BTreeMap::new();
    for (name, values) in &h.enums {
        assert_eq!(r.types.get(name).map(String::as_str), Some("c_int"), "enum typedef {name}");
        for (k, _) in values {
            enum_of.insert(k.clone(), name.clone());
        }
    }
    for (name, value) in &h.constants {
        let (ty, got) = r.consts.get(name).unwrap_or_else(|| panic!("{name} = {value} is not in src/lib.rs"));
        let want_ty = enum_of.get(name).cloned().unwrap_or_else(|| "i32".into());
        assert_eq!(ty, &want_ty, "type of {name}");
        assert_eq!(got.parse::<i64>().ok(), Some(*value), "value of {name}");
    }
    let extra: Vec<_> =
        r.consts.keys().filter(|k| !h.constants.contains_key(*k) && k.as_str() != "MOEKIT_VERSION").collect();
    assert!(extra.is_empty(), "constants in src/lib.rs that no header defines: {extra:?}");
}

// Sizes and offsets of the Rust structs, by name. The field lists are checked against the headers
// below, so this table cannot silently skip a field.
macro_rules! layouts {
    ($($s:ident { $($f:ident),* $(,)? })*) => {
        vec![$((
            stringify!($s).to_string(),
            std::mem::size_of::<moekit_sys::$s>(),
            vec![$((stringify!($f).to_string(), std::mem::offset_of!(moekit_sys::$s, $f))),*],
        )),*]
    };
}

/// (struct name, size, [(field, offset)]).
type Layout = (String, usize, Vec<(String, usize)>);

fn rust_layouts() -> Vec<Layout> {
    layouts! {
        moekit_router_config_t { struct_size, num_experts, top_k, score_func, softmax_order, num_groups,
            num_groups_kept, group_score, group_score_topn, group_mask, normalize, weights_use_bias,
            accumulate_load, route_scale }
        moekit_plan_config_t { struct_size, num_experts, top_k, local_expert_begin, num_local_experts, alignment,
            capacity, drop_policy }
        moekit_token_plan_t { struct_size, expert_counts, expert_offsets, row_of_slot, slot_of_row, totals }
        moekit_experts_config_t { struct_size, num_experts, hidden, inter, dtype, activation, gate_up_layout,
            weight_after_down, act_alpha, act_limit, gemm_path }
        moekit_mlp_config_t { struct_size, hidden, inter, dtype, activation, gate_up_layout, weight_layout,
            act_alpha, act_limit }
        moekit_layer_config_t { struct_size, hidden, dtype, router, experts, shared, shared_gate, router_bias,
            expert_bias, shared_bias, router_fp32, alignment, capacity, drop_policy, recompute, expert_parallel,
            ep_global_statistics }
        moekit_layer_params_t { struct_size, router_weight, router_bias, correction_bias, w_gate_up, b_gate_up,
            w_down, b_down, shared_w_gate_up, shared_b_gate_up, shared_w_down, shared_b_down, shared_gate_weight }
        moekit_layer_grads_t { struct_size, router_weight, router_bias, w_gate_up, b_gate_up, w_down, b_down,
            shared_w_gate_up, shared_b_gate_up, shared_w_down, shared_b_down, shared_gate_weight }
        moekit_layer_saved_view_t { struct_size, max_rows, logits_row_stride, logits_dtype, logits, weights,
            indices, expert_load, aux_score_sum, aux_token_count, expert_counts, expert_offsets, row_of_slot,
            slot_of_row, plan_totals, expert_u, shared_u, shared_gate_logit, shared_out, recv_rows, ep_layout, recv_x,
            recv_indices, recv_weights, recv_mask, ep_dropped, expert_xp, expert_row_weights }
        moekit_ep_config_t { struct_size, num_ranks, num_experts, top_k, dtype, combine_dtype, mode, num_chunks,
            hidden, max_tokens, capacity }
    }
}

/// sizeof/offsetof of every struct and the value of every constant, as a C compiler sees them;
/// None when no C compiler runs here.
fn c_facts(h: &Header) -> Option<BTreeMap<String, i64>> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("header_sync");
    fs::create_dir_all(&dir).unwrap();
    let mut src = String::from("#include <stddef.h>\n#include <stdio.h>\n");
    for f in header_files() {
        src += &format!("#include \"moekit/{}\"\n", f.file_name().unwrap().to_string_lossy());
    }
    src += "int main(void) {\n";
    for (name, fields) in &h.structs {
        src += &format!("  printf(\"size {name} %zu\\n\", sizeof({name}));\n");
        for (f, _) in fields {
            src += &format!("  printf(\"offset {name}.{f} %zu\\n\", offsetof({name}, {f}));\n");
        }
    }
    for name in h.constants.keys().chain(std::iter::once(&"MOEKIT_VERSION".to_string())) {
        src += &format!("  printf(\"const {name} %lld\\n\", (long long)({name}));\n");
    }
    src += "  return 0;\n}\n";
    fs::write(dir.join("layout.c"), src).unwrap();
    let exe = dir.join("layout");
    let status = Command::new(&cc)
        .args(["-std=c99", "-I"])
        .arg(include_dir())
        .arg(dir.join("layout.c"))
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Err(_) => return None,
        Ok(s) => assert!(s.success(), "compiling the layout program with {cc} failed"),
    }
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    let mut facts = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let mut w = line.split_whitespace();
        let (kind, key, value) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
        facts.insert(format!("{kind} {key}"), value.parse().unwrap());
    }
    Some(facts)
}

#[test]
fn struct_layouts_and_constants_match_the_c_compiler() {
    let h = parse_headers();
    let layouts = rust_layouts();
    // The table above lists exactly the header's structs and fields.
    let listed: BTreeMap<_, _> =
        layouts.iter().map(|(s, _, f)| (s.clone(), f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())).collect();
    let headers: BTreeMap<_, _> =
        h.structs.iter().map(|(s, f)| (s.clone(), f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())).collect();
    assert_eq!(listed, headers, "the layout table in this test must list every struct and field");
    let Some(facts) = c_facts(&h) else {
        println!("skipped: no C compiler (set CC) to print the C layout; the declarations were still compared");
        return;
    };
    for (name, size, fields) in &layouts {
        assert_eq!(facts[&format!("size {name}")], *size as i64, "sizeof({name})");
        for (f, off) in fields {
            assert_eq!(facts[&format!("offset {name}.{f}")], *off as i64, "offsetof({name}, {f})");
        }
    }
    for (name, value) in &h.constants {
        assert_eq!(facts[&format!("const {name}")], *value, "{name} as the C compiler sees it");
    }
    assert_eq!(facts["const MOEKIT_VERSION"], moekit_sys::MOEKIT_VERSION as i64);
}

#[test]
fn the_parser_reads_what_it_must() {
    let t = parse_type("void* const*");
    assert_eq!(rust_type(&t), "*const *mut c_void");
    assert_eq!(rust_type(&parse_type("const moekit_layer_params_t*")), "*const moekit_layer_params_t");
    assert_eq!(rust_type(&parse_type("moekit_layer_t*")), "*mut moekit_layer_t");
    let (name, ty) = split_decl("const float* aux_score_sum");
    assert_eq!((name.as_str(), rust_type(&ty).as_str()), ("aux_score_sum", "*const f32"));
    // A header with one more function, field or constant than src/lib.rs is caught.
    let mut h = parse_headers();
    parse_header_file(
        &mut h,
        "typedef struct moekit_new_config { size_t struct_size; int32_t extra; } moekit_new_config_t;\n\
         #define MOEKIT_NEW_LIMIT 7\nMOEKIT_API moekit_status_t moekit_new_call(int32_t x);\n",
    );
    let r = rust_decls();
    assert!(!r.functions.contains_key("moekit_new_call") && h.functions.contains_key("moekit_new_call"));
    assert!(!r.structs.contains_key("moekit_new_config_t") && h.structs.contains_key("moekit_new_config_t"));
    assert!(!r.consts.contains_key("MOEKIT_NEW_LIMIT") && h.constants["MOEKIT_NEW_LIMIT"] == 7);
}

#[test]
fn the_linked_library_answers() {
    // The declarations link and the library loads: a call that needs no device.
    let v = unsafe { moekit_sys::moekit_get_version() };
    assert_eq!(v, moekit_sys::MOEKIT_VERSION);
    let s = unsafe { std::ffi::CStr::from_ptr(moekit_sys::moekit_status_string(moekit_sys::MOEKIT_STATUS_MISALIGNED)) };
    assert!(!s.to_bytes().is_empty());
}
