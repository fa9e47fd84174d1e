//! No helm CLI exists here, so the chart is rendered by this file: Go's text/template, only the
//! subset the chart uses (`{{ .Values.x }}`, `$`, `{{-`/`-}}`, comments, `if`/`with`/`else`/
//! `end`, `define`, pipes, and Helm's `include`, `toYaml`, `nindent`, `indent`, `quote`,
//! `default`, `$.Files.Get`), with Helm's semantics: a missing value prints as "", fields of a missing map are an
//! error, `toYaml` drops its final newline. Anything else panics, so the chart cannot use a
//! construct these tests would render differently from Helm. `values.schema.json` is checked the
//! same way: `validate` knows the JSON Schema keywords the schema uses and panics on any other.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

#[derive(Debug, Clone)]
enum Arg {
    /// `.a.b` (from dot) or `$.a.b` (from the root); `.` alone is an empty path.
    Field { root: bool, path: Vec<String> },
    Str(String),
    Int(i64),
    Func(String),
}

type Pipeline = Vec<Vec<Arg>>;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Out(Pipeline),
    If(Pipeline, Vec<Node>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
}

/// A chart's templates, parsed: `define`d helpers and the files to render.
pub struct Chart {
    defines: BTreeMap<String, Vec<Node>>,
    files: BTreeMap<String, Vec<Node>>,
    /// Chart.yaml, as `.Chart` sees it.
    metadata: Value,
    /// The chart's directory, which `.Files.Get` reads from (symlinks followed, as Helm does).
    dir: std::path::PathBuf,
}

impl Chart {
    pub fn load(dir: &std::path::Path) -> Self {
        let meta: Value = serde_saphyr::from_str(&std::fs::read_to_string(dir.join("Chart.yaml")).expect("Chart.yaml")).expect("YAML");
        let chart = serde_json::json!({"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]});
        let mut c = Self { defines: BTreeMap::new(), files: BTreeMap::new(), metadata: chart, dir: dir.to_path_buf() };
        for e in std::fs::read_dir(dir.join("templates")).expect("templates") {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let nodes = c.parse_file(&std::fs::read_to_string(&p).expect("read"));
            if !name.starts_with('_') {
                c.files.insert(name, nodes);
            }
        }
        c
    }

    /// Every template (NOTES.txt included) rendered with `values` in namespace `namespace`.
    pub fn render(&self, values: &Value, namespace: &str) -> BTreeMap<String, String> {
        let root = serde_json::json!({"Values": values, "Release": {"Name": "mesh", "Namespace": namespace, "Service": "Helm"}, "Chart": self.metadata});
        self.files.iter().map(|(name, nodes)| (name.clone(), self.exec(nodes, &root, &root))).collect()
    }

    fn parse_file(&mut self, src: &str) -> Vec<Node> {
        let tokens = lex(src);
        let mut at = 0;
        let (nodes, end) = self.parse(&tokens, &mut at);
        assert!(end.is_none(), "unexpected {{{{ {} }}}}", end.unwrap_or_default());
        nodes
    }

    /// Nodes up to an `else`/`end` (returned) or the end of input (`None`).
    fn parse(&mut self, tokens: &[Tok], at: &mut usize) -> (Vec<Node>, Option<String>) {
        let mut nodes = Vec::new();
        while let Some(t) = tokens.get(*at) {
            *at += 1;
            let action = match t {
                Tok::Text(s) => {
                    nodes.push(Node::Text(s.clone()));
                    continue;
                }
                Tok::Action(a) => a.as_str(),
            };
            let (word, rest) = action.split_once(char::is_whitespace).unwrap_or((action, ""));
            match word {
                "end" | "else" => return (nodes, Some(word.to_owned())),
                "if" | "with" => {
                    let cond = pipeline(rest);
                    let (then, end) = self.parse(tokens, at);
                    let otherwise = match end.as_deref() {
                        Some("else") => {
                            let (o, end) = self.parse(tokens, at);
                            assert_eq!(end.as_deref(), Some("end"), "{word} without end");
                            o
                        }
                        Some("end") => Vec::new(),
                        _ => panic!("{word} without end"),
                    };
                    nodes.push(if word == "if" { Node::If(cond, then, otherwise) } else { Node::With(cond, then, otherwise) });
                }
                "define" => {
                    let name = rest.trim().strip_prefix('"').and_then(|r| r.strip_suffix('"')).expect("define \"name\"").to_owned();
                    let (body, end) = self.parse(tokens, at);
                    assert_eq!(end.as_deref(), Some("end"), "define {name} without end");
                    self.defines.insert(name, body);
                }
                "range" | "template" | "block" | "break" | "continue" => panic!("{{{{ {word} }}}} is outside the subset this renderer knows"),
                _ => nodes.push(Node::Out(pipeline(action))),
            }
        }
        (nodes, None)
    }

    fn exec(&self, nodes: &[Node], dot: &Value, root: &Value) -> String {
        let mut out = String::new();
        for n in nodes {
            match n {
                Node::Text(s) => out.push_str(s),
                Node::Out(p) => out.push_str(&text(&self.eval(p, dot, root))),
                Node::If(p, then, otherwise) => {
                    let branch = if truthy(&self.eval(p, dot, root)) { then } else { otherwise };
                    out.push_str(&self.exec(branch, dot, root));
                }
                Node::With(p, then, otherwise) => {
                    let v = self.eval(p, dot, root);
                    out.push_str(&if truthy(&v) { self.exec(then, &v, root) } else { self.exec(otherwise, dot, root) });
                }
            }
        }
        out
    }

    fn eval(&self, p: &Pipeline, dot: &Value, root: &Value) -> Value {
        let mut piped: Option<Value> = None;
        for cmd in p {
            let (head, rest) = cmd.split_first().expect("empty command");
            let mut args: Vec<Value> = rest.iter().map(|a| self.arg(a, dot, root)).collect();
            args.extend(piped.take());
            piped = Some(match head {
                Arg::Func(f) => self.call(f, &args, root),
                // Helm's `.Files.Get "path"`: a file of the chart, "" when missing (as Helm).
                Arg::Field { root: from_root, path } if path == &["Files", "Get"] => {
                    assert!(*from_root || dot == root, ".Files is a field of the root context: use $.Files inside with");
                    let [Value::String(name)] = args.as_slice() else { panic!(".Files.Get takes one path, not {args:?}") };
                    Value::String(std::fs::read_to_string(self.dir.join(name)).unwrap_or_default())
                }
                value => {
                    assert!(args.is_empty(), "{value:?} is not a function: it takes no arguments");
                    self.arg(value, dot, root)
                }
            });
        }
        piped.expect("empty pipeline")
    }

    fn arg(&self, a: &Arg, dot: &Value, root: &Value) -> Value {
        match a {
            Arg::Str(s) => Value::String(s.clone()),
            Arg::Int(i) => Value::from(*i),
            Arg::Func(f) => self.call(f, &[], root),
            Arg::Field { root: from_root, path } => {
                let mut v = if *from_root { root } else { dot };
                for (i, key) in path.iter().enumerate() {
                    v = match v {
                        Value::Object(m) => m.get(key).unwrap_or(&Value::Null),
                        // Helm: "nil pointer evaluating interface {}.<key>" and friends.
                        other => panic!("can't evaluate field {key} in {other} (.{})", path[..=i].join(".")),
                    };
                }
                v.clone()
            }
        }
    }

    fn call(&self, f: &str, args: &[Value], root: &Value) -> Value {
        let n = |v: &Value| usize::try_from(v.as_i64().unwrap_or_else(|| panic!("{f}: {v} is not an integer"))).expect("a count");
        match (f, args) {
            ("include", [Value::String(name), ctx]) => {
                let body = self.defines.get(name).unwrap_or_else(|| panic!("no template {name:?} defined"));
                Value::String(self.exec(body, ctx, root))
            }
            ("toYaml", [v]) => Value::String(to_yaml(v)),
            ("nindent", [count, s]) => Value::String(format!("\n{}", indent(&text(s), n(count)))),
            ("indent", [count, s]) => Value::String(indent(&text(s), n(count))),
            ("quote", [v]) => Value::String(format!("{:?}", text(v))),
            ("default", [default, given]) => if truthy(given) { given.clone() } else { default.clone() },
            _ => panic!("function {f} with {} argument(s) is outside the subset this renderer knows", args.len()),
        }
    }
}

#[derive(Debug)]
enum Tok {
    Text(String),
    Action(String),
}

/// Text and actions, with `{{-`/`-}}` trimming applied and comments dropped.
fn lex(src: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("unclosed {{");
        let mut inner = &after[..end];
        // Go: "{{- " and " -}}" (the space is required; "{{-3}}" is a number).
        if let Some(i) = inner.strip_prefix("- ") {
            text = text.trim_end();
            inner = i;
        }
        let trim_right = inner.ends_with(" -");
        if trim_right {
            inner = &inner[..inner.len() - 2];
        }
        out.push(Tok::Text(text.to_owned()));
        let inner = inner.trim();
        if inner.starts_with("/*") {
            assert!(inner.ends_with("*/"), "unclosed comment");
        } else {
            out.push(Tok::Action(inner.to_owned()));
        }
        rest = &after[end + 2..];
        if trim_right {
            rest = rest.trim_start();
        }
    }
    out.push(Tok::Text(rest.to_owned()));
    out
}

fn pipeline(src: &str) -> Pipeline {
    let mut cmds = vec![Vec::new()];
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '|' {
            chars.next();
            cmds.push(Vec::new());
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next().expect("unterminated string") {
                    '"' => break,
                    '\\' => s.push(match chars.next().expect("escape") {
                        'n' => '\n',
                        other => other,
                    }),
                    other => s.push(other),
                }
            }
            cmds.last_mut().expect("a command").push(Arg::Str(s));
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '|' {
                    break;
                }
                assert!(c != '(' && c != ')', "parentheses are outside the subset this renderer knows: {src}");
                word.push(c);
                chars.next();
            }
            let arg = if let Some(path) = word.strip_prefix('$') {
                Arg::Field { root: true, path: path.split('.').filter(|s| !s.is_empty()).map(str::to_owned).collect() }
            } else if word.starts_with('.') {
                Arg::Field { root: false, path: word.split('.').filter(|s| !s.is_empty()).map(str::to_owned).collect() }
            } else if let Ok(i) = word.parse() {
                Arg::Int(i)
            } else {
                assert!(word.chars().all(|c| c.is_ascii_alphanumeric()), "unknown token {word:?} in {src:?}");
                Arg::Func(word)
            };
            cmds.last_mut().expect("a command").push(arg);
        }
    }
    assert!(cmds.iter().all(|c| !c.is_empty()), "empty command in {src:?}");
    cmds
}

/// Go template truth: false, 0, "", nil, and empty maps and lists are false.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// How `{{ x }}` prints a value (Helm prints a missing one as "").
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        other => panic!("printing {other} directly (Go would print map[...]): use toYaml"),
    }
}

fn to_yaml(v: &Value) -> String {
    let yaml = serde_saphyr::to_string(v).expect("YAML");
    yaml.strip_suffix('\n').unwrap_or(&yaml).to_owned()
}

fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.split('\n').map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n")
}

/// Helm's coalescing of a values file over the chart's defaults: maps merge key by key, anything
/// else (lists included) replaces, `null` deletes.
pub fn merge(base: &Value, over: &Value) -> Value {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            let mut m: Map<String, Value> = b.clone();
            for (k, v) in o {
                if v.is_null() {
                    m.remove(k);
                } else {
                    let merged = m.get(k).map_or_else(|| v.clone(), |old| merge(old, v));
                    m.insert(k.clone(), merged);
                }
            }
            Value::Object(m)
        }
        _ => over.clone(),
    }
}

/// Errors of `v` against the JSON Schema `schema` (draft 7), each naming the value's path.
pub fn validate(schema: &Value, v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, schema, v, "", &mut errors);
    errors
}

fn check(root: &Value, schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    let s = schema.as_object().expect("a schema is an object");
    let at = if path.is_empty() { "(root)" } else { path };
    for (key, rule) in s {
        match key.as_str() {
            "$schema" | "title" | "description" | "definitions" => {}
            "$ref" => {
                let name = rule.as_str().and_then(|r| r.strip_prefix("#/definitions/")).expect("only #/definitions/ refs");
                check(root, &root["definitions"][name], v, path, errors);
            }
            "type" => {
                let types: Vec<&str> = match rule {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().map(|t| t.as_str().expect("type name")).collect(),
                    _ => panic!("type: {rule}"),
                };
                let fits = |t: &str| match t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    "number" => v.is_number(),
                    "integer" => v.is_i64() || v.is_u64(),
                    other => panic!("unknown type {other}"),
                };
                if !types.iter().any(|t| fits(t)) {
                    errors.push(format!("{at}: {v} is not of type {}", types.join(" or ")));
                }
            }
            "properties" => {
                if let Value::Object(o) = v {
                    for (k, sub) in rule.as_object().expect("properties") {
                        if let Some(child) = o.get(k) {
                            check(root, sub, child, &format!("{path}.{k}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Value::Object(o) = v {
                    let known = s.get("properties").and_then(Value::as_object);
                    for (k, child) in o.iter().filter(|(k, _)| known.is_none_or(|p| !p.contains_key(*k))) {
                        match rule {
                            Value::Bool(false) => errors.push(format!("{at}: unknown key {k:?}")),
                            Value::Bool(true) => {}
                            sub => check(root, sub, child, &format!("{path}.{k}"), errors),
                        }
                    }
                }
            }
            "required" => {
                if let Value::Object(o) = v {
                    for k in rule.as_array().expect("required").iter().filter_map(Value::as_str) {
                        if !o.contains_key(k) {
                            errors.push(format!("{at}: {k:?} is required"));
                        }
                    }
                }
            }
            "items" => {
                if let Value::Array(items) = v {
                    for (i, item) in items.iter().enumerate() {
                        check(root, rule, item, &format!("{path}[{i}]"), errors);
                    }
                }
            }
            "enum" => {
                if !rule.as_array().expect("enum").contains(v) {
                    errors.push(format!("{at}: {v} is not one of {rule}"));
                }
            }
            "pattern" => {
                if let Value::String(text) = v {
                    let re = regex::Regex::new(rule.as_str().expect("pattern")).expect("a valid pattern");
                    if !re.is_match(text) {
                        errors.push(format!("{at}: {text:?} does not match {rule}"));
                    }
                }
            }
            "minimum" => {
                if let (Some(x), Some(min)) = (v.as_f64(), rule.as_f64())
                    && x < min
                {
                    errors.push(format!("{at}: {v} is less than {rule}"));
                }
            }
            "minLength" => {
                if let (Value::String(text), Some(min)) = (v, rule.as_u64())
                    && (text.chars().count() as u64) < min
                {
                    errors.push(format!("{at}: {text:?} is shorter than {min}"));
                }
            }
            other => panic!("schema keyword {other:?} is outside the subset this validator knows: add it here first"),
        }
    }
}
