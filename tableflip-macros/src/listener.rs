//! `#[listener(NETWORK, ADDRESS, options…)]` on `static NAME: T;`.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Attribute, Ident, LitStr, Token, Type, Visibility};

use crate::args::{self, Errors, OptList, Value, ValueKind};

const NETWORKS: &[&str] = &[
    "tcp",
    "tcp4",
    "tcp6",
    "udp",
    "udp4",
    "udp6",
    "unix",
    "unixgram",
    "unixpacket",
];

const OPTIONS: &[(&str, ValueKind)] = &[
    ("env", ValueKind::Str),
    ("backlog", ValueKind::Int),
    ("mode", ValueKind::Int),
    ("crate", ValueKind::Str),
];

/// The attribute's arguments.
struct Args {
    network: Option<LitStr>,
    address: Option<LitStr>,
    opts: OptList,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args {
            network: None,
            address: None,
            opts: OptList::new(),
        };
        if input.is_empty() {
            return Ok(args);
        }
        if input.peek(LitStr) {
            args.network = Some(input.parse()?);
            if input.is_empty() {
                return Ok(args);
            }
            input.parse::<Token![,]>()?;
            if input.peek(LitStr) {
                args.address = Some(input.parse()?);
                if input.is_empty() {
                    return Ok(args);
                }
                input.parse::<Token![,]>()?;
            }
        }
        args.opts = OptList::parse_terminated(input)?;
        Ok(args)
    }
}

/// `static NAME: T;`, parsed by hand: `syn::ItemStatic` requires an
/// initializer.
struct Decl {
    attrs: Vec<Attribute>,
    vis: Visibility,
    static_token: Token![static],
    mutability: Option<Token![mut]>,
    ident: Ident,
    ty: Option<Type>,
    errors: Vec<syn::Error>,
}

impl Parse for Decl {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        if !input.peek(Token![static]) {
            let what = describe_item(input);
            return Err(input.error(format!(
                "#[listener] applies to a `static NAME: Type;` declaration, not to {what}"
            )));
        }
        let static_token: Token![static] = input.parse()?;
        let mutability: Option<Token![mut]> = input.parse()?;
        let ident: Ident = input.parse()?;
        let mut errors = Vec::new();
        if input.peek(Token![<]) {
            let generics: syn::Generics = input.parse()?;
            errors.push(syn::Error::new_spanned(
                &generics,
                "a #[listener] static cannot have generic parameters",
            ));
        }
        let ty = if input.peek(Token![:]) {
            input.parse::<Token![:]>()?;
            if input.peek(Token![;]) || input.peek(Token![=]) {
                errors.push(syn::Error::new(
                    ident.span(),
                    format!("missing type for `{ident}`; write `static {ident}: TcpListener;`"),
                ));
                None
            } else {
                Some(input.parse::<Type>()?)
            }
        } else {
            errors.push(syn::Error::new(
                ident.span(),
                format!("missing type for `{ident}`; write `static {ident}: TcpListener;`"),
            ));
            None
        };
        if input.peek(Token![=]) {
            let eq: Token![=] = input.parse()?;
            let init: syn::Expr = input.parse()?;
            let mut tokens = eq.to_token_stream();
            init.to_tokens(&mut tokens);
            errors.push(syn::Error::new_spanned(
                tokens,
                "a #[listener] static has no initializer: the socket is inherited or bound at startup; remove `= …`",
            ));
        }
        input.parse::<Token![;]>()?;
        Ok(Decl {
            attrs,
            vis,
            static_token,
            mutability,
            ident,
            ty,
            errors,
        })
    }
}

fn describe_item(input: ParseStream<'_>) -> &'static str {
    if input.peek(Token![fn]) || input.peek(Token![async]) {
        "a function"
    } else if input.peek(Token![const]) {
        "a `const`"
    } else if input.peek(Token![struct]) {
        "a struct"
    } else if input.peek(Token![enum]) {
        "an enum"
    } else if input.peek(Token![let]) {
        "a `let` binding"
    } else {
        "this item"
    }
}

/// Which networks a socket type (by the last segment of its path) serves,
/// or `None` for a type the macro does not know (left to the trait bound).
fn serves(ty: &Type) -> Option<(String, &'static [&'static str])> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?.ident.to_string();
    let nets: &'static [&'static str] = match last.as_str() {
        "TcpListener" => &["tcp", "tcp4", "tcp6"],
        "UdpSocket" => &["udp", "udp4", "udp6"],
        "UnixListener" => &["unix"],
        "UnixDatagram" => &["unixgram"],
        "Socket" => NETWORKS,
        _ => return None,
    };
    Some((last, nets))
}

fn check_address(network: &str, address: &LitStr, errors: &mut Errors) {
    let value = address.value();
    let err = |msg: String| syn::Error::new(address.span(), msg);
    if value.is_empty() {
        errors.push(err(format!("empty address for a `{network}` listener")));
        return;
    }
    if network.starts_with("unix") {
        if value.contains('\0') {
            errors.push(err(
                "a Unix socket address cannot contain a NUL byte".to_owned()
            ));
        } else if value.len() > 107 {
            errors.push(err(format!(
                "a Unix socket address is at most 107 bytes; this one has {}",
                value.len()
            )));
        }
        return;
    }
    if value.starts_with('/') || value.starts_with('.') || value.starts_with('@') {
        errors.push(err(format!(
            "`{value}` looks like a Unix socket address, but the network is `{network}`; use `unix` or write `host:port`"
        )));
        return;
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        errors.push(err(format!(
            "missing port in `{value}`; expected `host:port`, e.g. `127.0.0.1:8080`"
        )));
        return;
    };
    if port.is_empty() {
        errors.push(err(format!(
            "missing port in `{value}`; expected `host:port`, e.g. `127.0.0.1:8080`"
        )));
        return;
    }
    match port.parse::<u32>() {
        Ok(p) if p > 65535 => errors.push(err(format!(
            "port {p} is out of range; ports go from 0 to 65535"
        ))),
        Ok(_) => {}
        Err(_) => errors.push(err(format!(
            "invalid port `{port}`; expected a number from 0 to 65535"
        ))),
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let inner = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = inner.parse::<std::net::IpAddr>() {
        if ip.is_ipv6() && !bracketed {
            errors.push(err(format!(
                "write an IPv6 address in brackets: `[{inner}]:{port}`"
            )));
        } else if ip.is_ipv4() && network.ends_with('6') {
            errors.push(err(format!(
                "`{inner}` is an IPv4 address, but the network is `{network}`"
            )));
        } else if ip.is_ipv6() && network.ends_with('4') {
            errors.push(err(format!(
                "`{inner}` is an IPv6 address, but the network is `{network}`"
            )));
        }
    } else if bracketed {
        errors.push(err(format!("`{inner}` is not an IPv6 address")));
    }
}

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = match syn::parse2::<Args>(attr) {
        Ok(a) => Some(a),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let decl = match syn::parse2::<Decl>(item.clone()) {
        Ok(d) => d,
        Err(e) => {
            errors.push(e);
            let err = errors.take().map(|e| e.to_compile_error());
            return quote! { #err #item };
        }
    };
    for e in &decl.errors {
        errors.push(e.clone());
    }
    if let Some(m) = &decl.mutability {
        errors.push(syn::Error::new(
            m.span().join(decl.ident.span()).unwrap_or(m.span()),
            "a #[listener] static cannot be `mut`; take the socket with `NAME.take()`",
        ));
    }
    let parsed = args.is_some();
    let (network, address, opts) = match args {
        Some(a) => (
            a.network,
            a.address,
            args::parse_opts(a.opts, OPTIONS, &mut errors),
        ),
        None => (None, None, Vec::new()),
    };
    let krate = args::crate_path(&opts, &mut errors);

    let call_site = Span::call_site();
    if parsed {
        match &network {
            None => errors.push(syn::Error::new(
                call_site,
                "missing network and address; write `#[listener(\"tcp\", \"127.0.0.1:8080\")]`",
            )),
            Some(n) if !NETWORKS.contains(&n.value().as_str()) => {
                let hint = args::closest(&n.value(), NETWORKS.iter().copied())
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_default();
                let list: Vec<String> = NETWORKS.iter().map(|n| format!("`{n}`")).collect();
                errors.push(syn::Error::new(
                    n.span(),
                    format!(
                        "unknown network `{}`; expected one of {}{hint}",
                        n.value(),
                        list.join(", ")
                    ),
                ));
            }
            Some(n) => match &address {
                None => errors.push(syn::Error::new(
                    n.span(),
                    format!(
                        "missing address after the network; write `#[listener(\"{}\", \"…\")]`",
                        n.value()
                    ),
                )),
                Some(a) => check_address(&n.value(), a, &mut errors),
            },
        }
    }
    if let (Some(n), Some(ty)) = (&network, &decl.ty) {
        if let Some((type_name, nets)) = serves(ty) {
            let net = n.value();
            if NETWORKS.contains(&net.as_str()) && !nets.contains(&net.as_str()) {
                let list: Vec<String> = nets.iter().map(|n| format!("`{n}`")).collect();
                errors.push(syn::Error::new_spanned(
                    ty,
                    format!(
                        "a `{net}` socket cannot be used as `{type_name}`; `{type_name}` serves {}",
                        list.join(", ")
                    ),
                ));
            }
        }
    }
    let mut env = quote!(::core::option::Option::None);
    let mut backlog = quote!(::core::option::Option::None);
    let mut mode = quote!(::core::option::Option::None);
    for (key, value) in &opts {
        match (key.as_str(), value) {
            ("env", Value::Str(s, span)) => {
                if s.is_empty() || s.contains('=') || s.contains('\0') {
                    errors.push(syn::Error::new(
                        *span,
                        format!("`{s}` is not a valid environment variable name"),
                    ));
                }
                env = quote!(::core::option::Option::Some(#s));
            }
            ("backlog", Value::Int(n, span)) => match u32::try_from(*n) {
                Ok(n) if n > 0 => backlog = quote!(::core::option::Option::Some(#n)),
                _ => errors.push(syn::Error::new(
                    *span,
                    "backlog must be from 1 to 4294967295",
                )),
            },
            ("mode", Value::Int(n, span)) => {
                if !network
                    .as_ref()
                    .is_some_and(|n| n.value().starts_with("unix"))
                {
                    errors.push(syn::Error::new(*span, "`mode` sets the permissions of a Unix socket file; it needs a `unix*` network"));
                } else if *n > 0o7777 {
                    errors.push(syn::Error::new(
                        *span,
                        format!("mode {n:#o} is not a permission mode; write e.g. `0o660`"),
                    ));
                } else {
                    let n = *n as u32;
                    mode = quote!(::core::option::Option::Some(#n));
                }
            }
            _ => {}
        }
    }

    let Decl {
        attrs,
        vis,
        static_token,
        ident,
        ty,
        ..
    } = &decl;
    let Some(ty) = ty else {
        let err = errors.take().map(|e| e.to_compile_error());
        return quote! { #err };
    };
    let error = errors.take().map(|e| e.to_compile_error());
    let name = ident.to_string();
    let net = network
        .map(|n| n.value())
        .unwrap_or_else(|| "tcp".to_owned());
    let addr = address.map(|a| a.value()).unwrap_or_default();
    let type_name = ty.to_token_stream().to_string().replace(' ', "");
    let span = ty.span();
    let declared = quote_spanned! {span=> #krate::DeclaredListener<#ty> };
    quote! {
        #error
        #(#attrs)*
        #vis #static_token #ident: #declared =
            #krate::DeclaredListener::<#ty>::__new(#name, #net, #addr, #env, #backlog, #mode, #type_name);
        #krate::__private::inventory::submit! {
            #krate::__private::Registration { decl: || #ident.__decl() }
        }
    }
}
