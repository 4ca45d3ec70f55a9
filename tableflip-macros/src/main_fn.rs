//! `#[tableflip::main(options…)]` on `async fn main(cx: Context) -> Result<(), E>`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::args::{self, Errors, OptList, Value, ValueKind};

const OPTIONS: &[(&str, ValueKind)] = &[
    ("upgrade_timeout", ValueKind::Duration),
    ("drain_timeout", ValueKind::Duration),
    ("pid_file", ValueKind::Str),
    ("flavor", ValueKind::Str),
    ("worker_threads", ValueKind::Int),
    ("options", ValueKind::Path),
    ("crate", ValueKind::Str),
];

const FLAVORS: &[&str] = &["multi_thread", "current_thread"];

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let opts = match syn::parse::Parser::parse2(OptList::parse_terminated, attr) {
        Ok(list) => args::parse_opts(list, OPTIONS, &mut errors),
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };
    let func = match syn::parse2::<ItemFn>(item.clone()) {
        Ok(f) => f,
        Err(e) => {
            errors.push(syn::Error::new(
                e.span(),
                "#[tableflip::main] applies to `async fn main(cx: tableflip::Context) -> Result<(), E>`",
            ));
            let err = errors.take().map(|e| e.to_compile_error());
            return quote! { #err #item };
        }
    };
    let krate = args::crate_path(&opts, &mut errors);

    let sig = &func.sig;
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new(
            sig.fn_token.span,
            "the function must be `async`; write `async fn main(cx: Context)`",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "#[tableflip::main] cannot be used on a generic function",
        ));
    }
    if let Some(c) = &sig.constness {
        errors.push(syn::Error::new(
            c.span,
            "#[tableflip::main] function cannot be `const`",
        ));
    }
    if let Some(v) = &sig.variadic {
        errors.push(syn::Error::new_spanned(
            v,
            "#[tableflip::main] function cannot be variadic",
        ));
    }
    let mut param = None;
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => errors.push(syn::Error::new_spanned(
                r,
                "#[tableflip::main] function cannot take `self`",
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
                "#[tableflip::main] function takes at most one parameter, a `tableflip::Context`",
            )),
        }
    }

    let mut config = Vec::new();
    let mut flavor_current = None;
    let mut worker_threads_span = None;
    for (key, value) in &opts {
        match (key.as_str(), value) {
            ("upgrade_timeout", Value::Millis(ms)) => config.push(quote! {
                __cfg.upgrade_timeout = ::core::option::Option::Some(#krate::__private::millis(#ms));
            }),
            ("drain_timeout", Value::Millis(ms)) => config.push(quote! {
                __cfg.drain_timeout = ::core::option::Option::Some(#krate::__private::millis(#ms));
            }),
            ("pid_file", Value::Str(s, span)) => {
                if s.is_empty() {
                    errors.push(syn::Error::new(*span, "`pid_file` cannot be empty"));
                }
                config.push(quote! { __cfg.pid_file = ::core::option::Option::Some(#s); });
            }
            ("flavor", Value::Str(s, span)) => match s.as_str() {
                "multi_thread" => flavor_current = Some(false),
                "current_thread" => {
                    flavor_current = Some(true);
                    config.push(quote! { __cfg.flavor = #krate::__private::Flavor::CurrentThread; });
                }
                other => {
                    let hint = args::closest(other, FLAVORS.iter().copied())
                        .map(|c| format!("; did you mean `{c}`?"))
                        .unwrap_or_default();
                    errors.push(syn::Error::new(
                        *span,
                        format!("unknown flavor `{other}`; expected `multi_thread` or `current_thread`{hint}"),
                    ));
                }
            },
            ("worker_threads", Value::Int(n, span)) => {
                worker_threads_span = Some(*span);
                match usize::try_from(*n) {
                    Ok(n) if n > 0 => config.push(quote! {
                        __cfg.worker_threads = ::core::option::Option::Some(#n);
                    }),
                    _ => errors.push(syn::Error::new(*span, "`worker_threads` must be at least 1")),
                }
            }
            ("options", Value::Path(p)) => config.push(quote_spanned! {p.span()=>
                __cfg.options = ::core::option::Option::Some(#p as fn() -> #krate::Options);
            }),
            _ => {}
        }
    }
    if let (Some(true), Some(span)) = (flavor_current, worker_threads_span) {
        errors.push(syn::Error::new(
            span,
            "`worker_threads` cannot be set with `flavor = \"current_thread\"`, which runs on one thread",
        ));
    }

    let attrs = &func.attrs;
    let vis = &func.vis;
    let ident = &sig.ident;
    if let Some(err) = errors.take() {
        let err = err.to_compile_error();
        // Still emit a plain function of that name, so that no second
        // error (such as "`main` function not found") buries the first.
        return quote! {
            #err
            #(#attrs)*
            #vis fn #ident() {}
        };
    }

    let body = &func.block;
    let (output, wrap) = match &sig.output {
        ReturnType::Default => (quote!(), true),
        ReturnType::Type(_, ty) if is_unit(ty) => (quote!(-> #ty), true),
        ReturnType::Type(arrow, ty) => (quote!(#arrow #ty), false),
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
    let init_call = if wrap {
        quote! {
            async move {
                #call.await;
                ::core::result::Result::<(), ::core::convert::Infallible>::Ok(())
            }
        }
    } else {
        call
    };
    let span = Span::call_site();
    quote_spanned! {span=>
        #(#attrs)*
        #vis fn #ident() -> ::std::process::ExitCode {
            async fn __tableflip_init(#param_decl) #output #body
            let mut __cfg = #krate::__private::MainConfig::new();
            #(#config)*
            #krate::__private::run(__cfg, |__cx: #krate::Context| #init_call)
        }
    }
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
