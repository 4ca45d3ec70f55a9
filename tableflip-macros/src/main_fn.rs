//! `#[tableflip::main(options…)]` on `async fn main(cx: Context) -> Result<(), E>`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::args::{self, Errors, OptList, Value, ValueKind};

const OPTIONS: &[(&str, ValueKind)] = &[
    ("upgrade_timeout", ValueKind::Duration),
    ("drain_timeout", ValueKind::Duration),
    ("stop_delay", ValueKind::Duration),
    ("probation", ValueKind::Duration),
    ("upgrade_signal", ValueKind::Str),
    ("pid_file", ValueKind::Str),
    ("control_socket", ValueKind::Str),
    ("flavor", ValueKind::Str),
    ("worker_threads", ValueKind::Int),
    ("mode", ValueKind::Str),
    ("options", ValueKind::Path),
    ("crate", ValueKind::Str),
];

const FLAVORS: &[&str] = &["multi_thread", "current_thread"];

const MODES: &[&str] = &["supervised", "replace"];

const UPGRADE_SIGNALS: &[&str] = &["SIGHUP", "SIGUSR1", "SIGUSR2", "none"];

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let opts = match syn::parse::Parser::parse2(OptList::parse_terminated, attr) {
        Ok(list) => args::parse_opts(list, OPTIONS, &mut errors, check_value),
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };
    let Ok(func) = syn::parse2::<ItemFn>(item.clone()) else {
        errors.push(syn::Error::new(
            item.clone().into_iter().next().map_or_else(Span::call_site, |t| t.span()),
            "`#[tableflip::main]` applies to `async fn main(cx: tableflip::Context) -> Result<(), E>`",
        ));
        let err = errors.take().map(|e| e.to_compile_error());
        // A `main` too, so that no "`main` function not found" follows.
        return quote! {
            #err
            #item
            #[allow(dead_code)]
            fn main() {}
        };
    };
    let krate = args::crate_path(&opts, &mut errors);
    // Errors are reported in source order: the options, then the function.
    let config = config(&opts, &krate, &mut errors);
    let param = check_signature(&func.sig, &mut errors);

    // syn gathers the body's inner attributes (`#![allow(…)]` as the first
    // line of `main`) with the outer ones: they go back into the body,
    // where they were written (on the outer function rustc rejects them).
    let (inner_attrs, attrs): (Vec<&syn::Attribute>, Vec<&syn::Attribute>) = func
        .attrs
        .iter()
        .partition(|a| matches!(a.style, syn::AttrStyle::Inner(_)));
    let stmts = &func.block.stmts;
    let body = quote!({ #(#inner_attrs)* #(#stmts)* });
    let vis = &func.vis;
    let sig = &func.sig;
    let ident = &sig.ident;
    if let Some(err) = errors.take() {
        let err = err.to_compile_error();
        // Still emit a plain function of that name, so that no second
        // error (such as "`main` function not found") buries the first.
        // It keeps the body, never called, so that what the body uses
        // raises no "unused" warning, and its own mistakes still show.
        let inputs = sig
            .inputs
            .iter()
            .filter(|input| matches!(input, FnArg::Typed(_)));
        let (generics, output) = (&sig.generics, &sig.output);
        let where_clause = &generics.where_clause;
        return quote! {
            #err
            #(#attrs)*
            #vis fn #ident() {
                #[allow(dead_code, unused_variables, clippy::all)]
                async fn __tableflip_init #generics (#(#inputs),*) #output #where_clause #body
            }
        };
    }

    let (output, check) = match &sig.output {
        ReturnType::Default => (quote!(), None),
        ReturnType::Type(_, ty) if is_unit(ty) => (quote!(-> #ty), None),
        ReturnType::Type(arrow, ty) => (quote!(#arrow #ty), Some(ty)),
    };
    let (param_decl, call) = match &param {
        Some(p) => (quote!(#p), quote!(__tableflip_init(__cx))),
        None => (
            quote!(),
            quote!({
                let _ = __cx;
                __tableflip_init()
            }),
        ),
    };
    let init_call = match check {
        None => quote! {
            async move {
                #call.await;
                ::core::result::Result::<(), ::std::string::String>::Ok(())
            }
        },
        // Checked through a trait implemented for `Result<(), E: Debug>`
        // only, so that another return type, or an error type without
        // `Debug`, is one error, on that type, that says what to write.
        // The error is rendered here, where its type is concrete, so that
        // the best form is chosen: `Display` and its sources, `Debug` only
        // when there is nothing else (see `tableflip::__private::report`;
        // its catch-all keeps a wrong type to the one error above).
        Some(ty) => {
            let check = quote_spanned! {ty.span()=>
                <#ty as __InitOutput>::check();
            };
            quote! {
                async move {
                    let __result = #call.await;
                    #check
                    #[allow(unused_imports)]
                    use #krate::__private::report::{
                        ViaBoxedError as _, ViaDebug as _, ViaDisplay as _, ViaError as _,
                        ViaNothing as _,
                    };
                    #[allow(clippy::needless_borrow)]
                    let __rendered = (&&&&&#krate::__private::report::Report(__result)).tableflip_result();
                    __rendered
                }
            }
        }
    };
    let output_trait = check.map(|_| {
        quote! {
            #[diagnostic::on_unimplemented(
                message = "`#[tableflip::main]` function returns `{Self}`, not `()` or `Result<(), E>` with `E: Debug`",
                label = "expected `()` or `Result<(), E>` with `E: Debug`"
            )]
            trait __InitOutput {
                fn check() {}
            }
            impl<E: ::core::fmt::Debug> __InitOutput for ::core::result::Result<(), E> {}
        }
    });
    let span = Span::call_site();
    quote_spanned! {span=>
        #(#attrs)*
        #vis fn #ident() -> ::std::process::ExitCode {
            async fn __tableflip_init(#param_decl) #output #body
            #output_trait
            let mut __cfg = #krate::__private::MainConfig::new();
            #(#config)*
            #krate::__private::run(__cfg, |__cx: #krate::Context| #init_call)
        }
    }
}

/// Checks one option's value beyond its type.
fn check_value(opt: &args::Opt, value: &Value) -> syn::Result<()> {
    match (opt.key.to_string().as_str(), value) {
        ("pid_file", Value::Str(s, span)) if s.is_empty() => {
            Err(syn::Error::new(*span, "`pid_file` cannot be empty"))
        }
        ("control_socket", Value::Str(s, span)) if s.is_empty() => Err(syn::Error::new(
            *span,
            "`control_socket` cannot be empty; write a path, or \"none\" for no control socket",
        )),
        ("control_socket", Value::Str(s, span)) if s.contains('\0') => Err(syn::Error::new(
            *span,
            "`control_socket` cannot contain a NUL byte",
        )),
        ("flavor", Value::Str(s, span)) if !FLAVORS.contains(&s.as_str()) => {
            let hint = flavor_hint(s)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            Err(syn::Error::new(
                *span,
                format!("unknown flavor `{s}`; expected `multi_thread` or `current_thread`{hint}"),
            ))
        }
        ("mode", Value::Str(s, span)) if !MODES.contains(&s.as_str()) => {
            let hint = args::closest(s, MODES.iter().copied())
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            Err(syn::Error::new(
                *span,
                format!("unknown mode `{s}`; expected `supervised` or `replace`{hint}"),
            ))
        }
        ("upgrade_signal", Value::Str(s, span)) if !UPGRADE_SIGNALS.contains(&s.as_str()) => {
            let hint = args::closest(s, UPGRADE_SIGNALS.iter().copied())
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            Err(syn::Error::new(
                *span,
                format!(
                    "unknown upgrade signal `{s}`; expected `SIGHUP`, `SIGUSR1`, `SIGUSR2` or `none`{hint}"
                ),
            ))
        }
        ("worker_threads", Value::Int(n, span)) if *n == 0 || usize::try_from(*n).is_err() => Err(
            syn::Error::new(*span, "`worker_threads` must be at least 1"),
        ),
        _ => Ok(()),
    }
}

/// The statements that set up the `MainConfig` from the (checked) options.
fn config(opts: &[(String, Value)], krate: &syn::Path, errors: &mut Errors) -> Vec<TokenStream> {
    let mut config = Vec::new();
    let mut flavor_current = false;
    let mut worker_threads_span = None;
    for (key, value) in opts {
        match (key.as_str(), value) {
            ("upgrade_timeout", Value::Millis(ms)) => config.push(quote! {
                __cfg.upgrade_timeout = ::core::option::Option::Some(#krate::__private::millis(#ms));
            }),
            ("drain_timeout", Value::Millis(ms)) => config.push(quote! {
                __cfg.drain_timeout = ::core::option::Option::Some(#krate::__private::millis(#ms));
            }),
            ("probation", Value::Millis(ms)) => config.push(quote! {
                __cfg.probation = ::core::option::Option::Some(#krate::__private::millis(#ms));
            }),
            ("stop_delay", Value::Millis(ms)) => config.push(quote! {
                __cfg.stop_delay = ::core::option::Option::Some(#krate::__private::millis(#ms));
            }),
            ("upgrade_signal", Value::Str(s, _)) => {
                let signal = match s.as_str() {
                    "SIGUSR1" => quote! { #krate::UpgradeSignal::Usr1 },
                    "SIGUSR2" => quote! { #krate::UpgradeSignal::Usr2 },
                    "none" => quote! { #krate::UpgradeSignal::None },
                    _ => quote! { #krate::UpgradeSignal::Hup },
                };
                config.push(quote! { __cfg.upgrade_signal = ::core::option::Option::Some(#signal); });
            }
            ("control_socket", Value::Str(s, _)) if s == "none" => {
                config.push(quote! { __cfg.control_socket = ::core::option::Option::Some(::core::option::Option::None); });
            }
            ("control_socket", Value::Str(s, _)) => {
                config.push(quote! { __cfg.control_socket = ::core::option::Option::Some(::core::option::Option::Some(#s)); });
            }
            ("pid_file", Value::Str(s, _)) => {
                config.push(quote! { __cfg.pid_file = ::core::option::Option::Some(#s); });
            }
            ("mode", Value::Str(s, _)) => {
                let mode = if s == "supervised" {
                    quote! { #krate::Mode::Supervised }
                } else {
                    quote! { #krate::Mode::Replace }
                };
                config.push(quote! { __cfg.mode = ::core::option::Option::Some(#mode); });
            }
            ("flavor", Value::Str(s, _)) if s == "current_thread" => {
                flavor_current = true;
                config.push(quote! { __cfg.flavor = #krate::__private::Flavor::CurrentThread; });
            }
            ("worker_threads", Value::Int(n, span)) => {
                worker_threads_span = Some(*span);
                let n = usize::try_from(*n).unwrap_or(1);
                config.push(quote! {
                    __cfg.worker_threads = ::core::option::Option::Some(#n);
                });
            }
            // A coercion, not a cast: a function of another type is a
            // "mismatched types" error on the path.
            ("options", Value::Path(p)) => config.push(quote_spanned! {p.span()=>
                let __options: fn() -> #krate::Options = #p;
                __cfg.options = ::core::option::Option::Some(__options);
            }),
            _ => {}
        }
    }
    if let (true, Some(span)) = (flavor_current, worker_threads_span) {
        errors.push(syn::Error::new(
            span,
            "`worker_threads` cannot be set with `flavor = \"current_thread\"`, which runs on one thread",
        ));
    }
    config
}

/// The closest flavor to a mistaken one: by spelling, or by meaning
/// (`"single"`, `"multi"`).
fn flavor_hint(flavor: &str) -> Option<&'static str> {
    let lower = flavor.to_ascii_lowercase();
    if let Some(c) = args::closest(&lower, FLAVORS.iter().copied()) {
        return Some(c);
    }
    if ["single", "current", "local", "basic"]
        .iter()
        .any(|w| lower.contains(w))
    {
        Some("current_thread")
    } else if ["multi", "thread", "pool"]
        .iter()
        .any(|w| lower.contains(w))
    {
        Some("multi_thread")
    } else {
        None
    }
}

/// Checks the signature; returns the `Context` parameter, if any.
fn check_signature(sig: &syn::Signature, errors: &mut Errors) -> Option<syn::PatType> {
    if let Some(c) = &sig.constness {
        errors.push(syn::Error::new(
            c.span,
            "`#[tableflip::main]` function cannot be `const`",
        ));
    }
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new(
            sig.fn_token.span,
            "the function must be `async`; write `async fn main(cx: Context)`",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "`#[tableflip::main]` cannot be used on a generic function",
        ));
    }
    let mut param = None;
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => errors.push(syn::Error::new_spanned(
                r,
                "`#[tableflip::main]` function cannot take `self`",
            )),
            FnArg::Typed(pat) if i == 0 => {
                if is_context(&pat.ty) {
                    param = Some(pat.clone());
                } else {
                    errors.push(syn::Error::new_spanned(
                        &pat.ty,
                        "the parameter must be a `tableflip::Context`; write `cx: Context`",
                    ));
                }
            }
            FnArg::Typed(pat) => errors.push(syn::Error::new_spanned(
                pat,
                "`#[tableflip::main]` function takes at most one parameter, a `tableflip::Context`",
            )),
        }
    }
    if let Some(v) = &sig.variadic {
        errors.push(syn::Error::new_spanned(
            v,
            "`#[tableflip::main]` function cannot be variadic",
        ));
    }
    param
}

fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Context"),
        _ => false,
    }
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(t) if t.elems.is_empty())
}
