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
        // `#[listener(tcp, …)]`: a bare word where the network goes.
        if input.peek(Ident) && !input.peek2(Token![=]) {
            let word: Ident = input.parse()?;
            return Err(syn::Error::new(
                word.span(),
                format!("the network is a string literal: write `\"{word}\"`"),
            ));
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
    colon: Option<Token![:]>,
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
                "`#[listener]` applies to a `static NAME: Type;` declaration, not to {what}"
            )));
        }
        let static_token: Token![static] = input.parse()?;
        let mutability: Option<Token![mut]> = input.parse()?;
        let ident: Ident = input.parse()?;
        let mut errors = Vec::new();
        // Generic parameters and a missing type reach the attribute only
        // after rustc's parser has reported them ("static items may not
        // have generic parameters", "missing type for `static` item"), so
        // they are not reported twice here.
        if input.peek(Token![<]) {
            input.parse::<syn::Generics>()?;
        }
        let colon: Option<Token![:]> = input.parse()?;
        let ty = if colon.is_some() {
            if input.peek(Token![;]) || input.peek(Token![=]) {
                None
            } else {
                Some(input.parse::<Type>()?)
            }
        } else {
            None
        };
        if input.peek(Token![=]) {
            let eq: Token![=] = input.parse()?;
            let init: syn::Expr = input.parse()?;
            let mut tokens = eq.to_token_stream();
            init.to_tokens(&mut tokens);
            errors.push(syn::Error::new_spanned(
                tokens,
                "a `#[listener]` static has no initializer: the socket is inherited or bound at startup; remove `= …`",
            ));
        }
        input.parse::<Token![;]>()?;
        Ok(Decl {
            attrs,
            vis,
            static_token,
            mutability,
            ident,
            colon,
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
/// Connected sockets and files implement the runtime's `FromFd` too, but
/// serve no listener.
fn serves(ty: &Type) -> Option<(String, &'static [&'static str])> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?.ident.to_string();
    let nets: &'static [&'static str] = match last.as_str() {
        "TcpListener" => &["tcp", "tcp4", "tcp6"],
        "UdpSocket" => &["udp", "udp4", "udp6"],
        "UnixListener" => &["unix"],
        "UnixDatagram" => &["unixgram"],
        "Socket" => NETWORKS,
        "TcpStream" | "UnixStream" | "File" => &[],
        _ => return None,
    };
    Some((last, nets))
}

/// The type to declare for a listener on `network`.
fn type_for(network: &str) -> &'static str {
    match network {
        "tcp" | "tcp4" | "tcp6" => "TcpListener",
        "udp" | "udp4" | "udp6" => "UdpSocket",
        "unix" => "UnixListener",
        "unixgram" => "UnixDatagram",
        _ => "socket2::Socket",
    }
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
    // Errors are reported in source order: the attribute's arguments left
    // to right, then the declaration.
    let (network, address, opts) = match args {
        Some(a) => {
            check_network_address(a.network.as_ref(), a.address.as_ref(), &mut errors);
            let unix = a
                .network
                .as_ref()
                .is_some_and(|n| n.value().starts_with("unix"));
            let opts = args::parse_opts(a.opts, OPTIONS, &mut errors, |opt, value| {
                check_value(opt, value, unix)
            });
            (a.network, a.address, opts)
        }
        None => (None, None, Vec::new()),
    };
    let krate = args::crate_path(&opts, &mut errors);
    let mut env = quote!(::core::option::Option::None);
    let mut backlog = quote!(::core::option::Option::None);
    let mut mode = quote!(::core::option::Option::None);
    for (key, value) in &opts {
        // Checked by `check_value`: in range.
        match (key.as_str(), value) {
            ("env", Value::Str(s, _)) => env = quote!(::core::option::Option::Some(#s)),
            ("backlog", Value::Int(n, _)) => {
                let n = u32::try_from(*n).unwrap_or(u32::MAX);
                backlog = quote!(::core::option::Option::Some(#n));
            }
            ("mode", Value::Int(n, _)) => {
                let n = u32::try_from(*n).unwrap_or(0);
                mode = quote!(::core::option::Option::Some(#n));
            }
            _ => {}
        }
    }
    if let (Some(n), Some(ty)) = (&network, &decl.ty) {
        check_type(&n.value(), ty, &mut errors);
    }
    for e in &decl.errors {
        errors.push(e.clone());
    }
    if let Some(m) = &decl.mutability {
        errors.push(syn::Error::new(
            m.span,
            "a `#[listener]` static cannot be `mut`; take the socket with `NAME.take()`",
        ));
    }

    let Decl {
        attrs,
        vis,
        static_token,
        ident,
        colon,
        ty,
        ..
    } = &decl;
    let error = errors.take().map(|e| e.to_compile_error());
    let Some(ty) = ty else {
        // rustc's parser has noted the missing type, and completes its
        // error with the type it infers from this initializer: "provide a
        // type for the static variable: `: TcpListener`". The user's `:`,
        // if any, is kept so that both name the same spot. Uses of the
        // static raise no further error.
        let suggested = match network.as_ref().map(LitStr::value).as_deref() {
            Some("udp" | "udp4" | "udp6") => quote!(::std::net::UdpSocket),
            Some("unix") => quote!(::std::os::unix::net::UnixListener),
            Some("unixgram") => quote!(::std::os::unix::net::UnixDatagram),
            Some("unixpacket") => quote!(#krate::socket2::Socket),
            _ => quote!(::std::net::TcpListener),
        };
        return quote! {
            #error
            #(#attrs)*
            #[allow(unreachable_code, unused_variables)]
            #vis #static_token #ident #colon = {
                let socket: #suggested = ::core::unreachable!();
                socket
            };
        };
    };
    let name = ident.to_string();
    let net = network.map_or_else(|| "tcp".to_owned(), |n| n.value());
    let addr = address.map(|a| a.value()).unwrap_or_default();
    let type_name = ty.to_token_stream().to_string().replace(' ', "");
    // Spanned on the type, so that a type that is no socket type is
    // reported there.
    let span = ty.span();
    let declared = quote_spanned! {span=> #krate::DeclaredListener<#ty> };
    let new = quote_spanned! {span=>
        #krate::__private::declared_listener::<#ty>(
            #name, #net, #addr, #env, #backlog, #mode, #type_name,
            #krate::__private::serves::<#ty>,
        )
    };
    let decl_fn = quote_spanned! {span=> || #krate::__private::declaration(&#ident) };
    quote! {
        #error
        #(#attrs)*
        #vis #static_token #ident: #declared = #new;
        #krate::__private::inventory::submit! {
            #krate::__private::Registration { decl: #decl_fn }
        }
    }
}

/// Checks one option's value beyond its type; `unix`: whether the network
/// is a Unix one.
fn check_value(opt: &args::Opt, value: &Value, unix: bool) -> syn::Result<()> {
    match (opt.key.to_string().as_str(), value) {
        ("env", Value::Str(s, span)) if s.is_empty() || s.contains('=') || s.contains('\0') => {
            Err(syn::Error::new(
                *span,
                format!("`{s}` is not a valid environment variable name"),
            ))
        }
        ("backlog", Value::Int(n, span)) if *n == 0 || u32::try_from(*n).is_err() => Err(
            syn::Error::new(*span, "`backlog` must be from 1 to 4294967295"),
        ),
        ("mode", Value::Int(_, span)) if !unix => Err(syn::Error::new(
            *span,
            "`mode` sets the permissions of a Unix socket file; it needs a `unix*` network",
        )),
        ("mode", Value::Int(n, span)) if !written_in_octal(&opt.value) => {
            // A decimal `660` is a common slip that would set other bits.
            let digits = n.to_string();
            let example = if digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                digits
            } else {
                "660".to_owned()
            };
            Err(syn::Error::new(
                *span,
                format!("write the mode in octal, as `chmod` reads it: `0o{example}`"),
            ))
        }
        ("mode", Value::Int(n, span)) if *n > 0o7777 => Err(syn::Error::new(
            *span,
            format!("mode {n:#o} is not a permission mode; write e.g. `0o660`"),
        )),
        _ => Ok(()),
    }
}

/// Whether an integer literal is written in octal (`0o660`), or is 0.
fn written_in_octal(expr: &syn::Expr) -> bool {
    match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i),
            ..
        }) => i.to_string().starts_with("0o") || i.base10_digits() == "0",
        _ => true,
    }
}

fn check_network_address(network: Option<&LitStr>, address: Option<&LitStr>, errors: &mut Errors) {
    match network {
        None => errors.push(syn::Error::new(
            Span::call_site(),
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
        Some(n) => match address {
            None => errors.push(syn::Error::new(
                n.span(),
                format!(
                    "missing address after the network; write `#[listener(\"{}\", \"…\")]`",
                    n.value()
                ),
            )),
            Some(a) => check_address(&n.value(), a, errors),
        },
    }
}

/// A socket type that cannot serve `network` is an error on the type.
fn check_type(network: &str, ty: &Type, errors: &mut Errors) {
    let Some((type_name, nets)) = serves(ty) else {
        return;
    };
    if !NETWORKS.contains(&network) || nets.contains(&network) {
        return;
    }
    let right = type_for(network);
    let msg = if nets.is_empty() {
        let what = if type_name == "File" {
            "a file"
        } else {
            "a connected socket"
        };
        format!(
            "a `{network}` listener cannot be used as `{type_name}`, {what}; declare it as `{right}`"
        )
    } else {
        let list: Vec<String> = nets.iter().map(|n| format!("`{n}`")).collect();
        format!(
            "a `{network}` socket cannot be used as `{type_name}`, which serves {}; declare it as `{right}`",
            list.join(", ")
        )
    };
    errors.push(syn::Error::new_spanned(ty, msg));
}
