//! Parsing of `key = value` attribute options, driven by one table of known
//! keys per attribute (parsing, duplicate detection and the "expected one
//! of" list all come from it).

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, Lit, Token};

/// The type of value a key takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueKind {
    /// A string literal.
    Str,
    /// An integer literal.
    Int,
    /// A path (`path::to::fn`).
    Path,
    /// A duration string: `"30s"`, `"500ms"`, `"2m"`, `"1h"`.
    Duration,
}

impl ValueKind {
    fn describe(self) -> &'static str {
        match self {
            ValueKind::Str => "a string literal",
            ValueKind::Int => "an integer literal",
            ValueKind::Path => "a path to a function",
            ValueKind::Duration => "a duration string such as `\"30s\"` or `\"500ms\"`",
        }
    }
}

/// One option as written: `key = value`.
pub(crate) struct Opt {
    pub(crate) key: syn::Ident,
    pub(crate) value: Expr,
}

impl Parse for Opt {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        // `crate` is a keyword: accept it as a key.
        let key = if input.peek(Token![crate]) {
            let kw: Token![crate] = input.parse()?;
            syn::Ident::new("crate", kw.span)
        } else {
            input.call(syn::ext::IdentExt::parse_any)?
        };
        if !input.peek(Token![=]) {
            return Err(syn::Error::new(key.span(), format!("expected `{key} = …`")));
        }
        input.parse::<Token![=]>()?;
        let value = input.parse()?;
        Ok(Opt { key, value })
    }
}

/// A parsed value.
#[derive(Clone)]
pub(crate) enum Value {
    Str(String, Span),
    Int(u64, Span),
    Path(syn::Path),
    Millis(u64),
}

/// Parses the options against `table`, collecting every error. `check`
/// validates each well-typed value further (a range, a known name); an
/// option that fails it is left out of the result. Errors come in the
/// order the options are written.
pub(crate) fn parse_opts(
    opts: impl IntoIterator<Item = Opt>,
    table: &[(&str, ValueKind)],
    errors: &mut Errors,
    mut check: impl FnMut(&Opt, &Value) -> syn::Result<()>,
) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for opt in opts {
        let key = opt.key.to_string();
        let Some((_, kind)) = table.iter().find(|(k, _)| *k == key) else {
            let expected: Vec<String> = table.iter().map(|(k, _)| format!("`{k}`")).collect();
            let hint = closest(&key, table.iter().map(|(k, _)| *k))
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            errors.push(syn::Error::new(
                opt.key.span(),
                format!(
                    "unknown option `{key}`; expected one of {}{hint}",
                    expected.join(", ")
                ),
            ));
            continue;
        };
        if seen.contains(&key) {
            errors.push(syn::Error::new(
                opt.key.span(),
                format!("duplicate option `{key}`"),
            ));
            continue;
        }
        seen.push(key.clone());
        match parse_value(&opt.value, *kind).and_then(|v| check(&opt, &v).map(|()| v)) {
            Ok(v) => out.push((key, v)),
            Err(e) => errors.push(e),
        }
    }
    out
}

fn parse_value(expr: &Expr, kind: ValueKind) -> syn::Result<Value> {
    let wrong = |what: &str| {
        syn::Error::new_spanned(expr, format!("expected {}, found {what}", kind.describe()))
    };
    let lit = match expr {
        Expr::Lit(ExprLit { lit, .. }) => Some(lit),
        _ => None,
    };
    match (kind, lit, expr) {
        (ValueKind::Str, Some(Lit::Str(s)), _) => Ok(Value::Str(s.value(), s.span())),
        (ValueKind::Int, Some(Lit::Int(i)), _) => i
            .base10_parse::<u64>()
            .map(|n| Value::Int(n, i.span()))
            .map_err(|e| syn::Error::new(i.span(), e.to_string())),
        (ValueKind::Duration, Some(Lit::Str(s)), _) => parse_duration(&s.value())
            .map(Value::Millis)
            .map_err(|msg| syn::Error::new(s.span(), msg)),
        (ValueKind::Path, None, Expr::Path(p)) if p.qself.is_none() => {
            Ok(Value::Path(p.path.clone()))
        }
        (_, Some(Lit::Str(_)), _) => Err(wrong("a string literal")),
        (_, Some(Lit::Int(_)), _) => Err(wrong("an integer literal")),
        (_, Some(_), _) => Err(wrong("a literal of another type")),
        (_, None, Expr::Path(_)) => Err(wrong("a path")),
        _ => Err(wrong("an expression")),
    }
}

/// Parses `"30s"`, `"500ms"`, `"2m"`, `"1h"` into milliseconds.
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let unit = &s[digits.len()..];
    let bad = || {
        format!(
            "invalid duration `{s}`; expected a whole number and a unit: `500ms`, `30s`, `2m`, `1h`"
        )
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("duration `{s}` is too large"))
}

/// The candidate closest to `word` by edit distance, if close enough to be
/// a likely typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal-string-alignment distance: edits plus adjacent transpositions
/// (`tpc` is one edit from `tcp`).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Comma-separated options.
pub(crate) type OptList = Punctuated<Opt, Token![,]>;

/// Collects errors so the user sees every mistake at once.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub(crate) fn take(self) -> Option<syn::Error> {
        self.0
    }
}

/// The path to the runtime crate: `::tableflip`, or `crate = "…"`.
pub(crate) fn crate_path(opts: &[(String, Value)], errors: &mut Errors) -> syn::Path {
    for (key, value) in opts {
        if let ("crate", Value::Str(s, span)) = (key.as_str(), value) {
            match syn::parse_str::<syn::Path>(s) {
                Ok(mut p) => {
                    for seg in &mut p.segments {
                        seg.ident.set_span(*span);
                    }
                    return p;
                }
                Err(_) => errors.push(syn::Error::new(
                    *span,
                    format!(
                        "`{s}` is not a path; write the path to the crate, e.g. `crate = \"tf\"`"
                    ),
                )),
            }
        }
    }
    syn::parse_quote!(::tableflip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("2m"), Ok(120_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        for bad in ["", "s", "10", "1.5s", "10 s", "-1s", "3d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        let nets = ["tcp", "tcp4", "udp", "unix", "unixgram"];
        assert_eq!(closest("tpc", nets), Some("tcp"));
        assert_eq!(closest("unixgrm", nets), Some("unixgram"));
        assert_eq!(closest("zzzzzz", nets), None);
    }
}
