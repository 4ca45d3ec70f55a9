//! How `#[tableflip::main]` turns the init function's error into a log
//! line: the error's `Display` text and its `source()` chain when it is a
//! `std::error::Error` (or a boxed one), its alternate `Display` (`{:#}`,
//! which `anyhow` and `eyre` use for the whole chain) when it only has
//! `Display`, and `Debug` only for a type that has nothing else.
//!
//! The choice is made on the concrete error type at the call site that
//! `#[tableflip::main]` generates, by method resolution ("autoref
//! specialisation"): `(&&&&&Report(result)).tableflip_result()` finds the
//! impl on the most specific receiver first. Each trait has its own
//! receiver depth, so they never overlap.

use std::error::Error;
use std::fmt::{Debug, Display};

/// Wraps the init function's result. Not public API.
#[derive(Debug)]
pub struct Report<T>(pub T);

/// A boxed `dyn Error` (which does not itself implement `Error`): its
/// text and its sources.
pub trait ViaBoxedError {
    /// `Ok`, or the error's report.
    fn tableflip_result(&self) -> Result<(), String>;
}

/// A `std::error::Error`: its text and its sources.
pub trait ViaError {
    /// `Ok`, or the error's report.
    fn tableflip_result(&self) -> Result<(), String>;
}

/// A type with `Display` only: its alternate form.
pub trait ViaDisplay {
    /// `Ok`, or the error's report.
    fn tableflip_result(&self) -> Result<(), String>;
}

/// A type with `Debug` only.
pub trait ViaDebug {
    /// `Ok`, or the error's report.
    fn tableflip_result(&self) -> Result<(), String>;
}

/// Anything else. Never reached in a program that compiles (the macro
/// requires `Result<(), E: Debug>`); it exists so that a wrong return type
/// is one compile error, the macro's, and not a second one here.
pub trait ViaNothing {
    /// An error saying so.
    fn tableflip_result(&self) -> Result<(), String>;
}

fn render<E>(result: &Result<(), E>, how: impl FnOnce(&E) -> String) -> Result<(), String> {
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(how(e)),
    }
}

macro_rules! boxed {
    ($($ty:ty),*) => {$(
        impl ViaBoxedError for &&&&Report<Result<(), Box<$ty>>> {
            fn tableflip_result(&self) -> Result<(), String> {
                render(&self.0, |e| chain(&**e))
            }
        }
    )*};
}

boxed!(
    dyn Error,
    dyn Error + Send,
    dyn Error + Sync,
    dyn Error + Send + Sync
);

impl<E: Error> ViaError for &&&Report<Result<(), E>> {
    fn tableflip_result(&self) -> Result<(), String> {
        render(&self.0, |e| chain(e))
    }
}

impl<E: Display> ViaDisplay for &&Report<Result<(), E>> {
    fn tableflip_result(&self) -> Result<(), String> {
        render(&self.0, |e| format!("{e:#}"))
    }
}

impl<E: Debug> ViaDebug for &Report<Result<(), E>> {
    fn tableflip_result(&self) -> Result<(), String> {
        render(&self.0, |e| format!("{e:?}"))
    }
}

impl<T> ViaNothing for Report<T> {
    fn tableflip_result(&self) -> Result<(), String> {
        Err("the init function's result cannot be shown".to_owned())
    }
}

/// `error: source: source of source…`, leaving out a source whose text
/// the message already shows (an error type may include its source in its
/// own `Display`).
pub(crate) fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let line = source.to_string();
        if !line.is_empty() && !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        next = source.source();
    }
    text
}

#[cfg(test)]
// The borrows are the mechanism: each depth selects another trait.
#[allow(clippy::needless_borrow)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot load the configuration")
        }
    }

    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[derive(Debug)]
    struct OnlyDebug;

    #[test]
    fn each_kind_of_error_is_reported_by_its_best_form() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "app.toml: no such file");
        let err = |s: &str| Err(s.to_owned());
        let outer: Result<(), Outer> = Err(Outer(io));
        assert_eq!(
            (&&&&&Report(outer)).tableflip_result(),
            err("cannot load the configuration: app.toml: no such file")
        );
        let boxed: Result<(), Box<dyn Error + Send + Sync>> =
            Err(Box::new(Outer(std::io::Error::other("x"))));
        assert_eq!(
            (&&&&&Report(boxed)).tableflip_result(),
            err("cannot load the configuration: x")
        );
        let env = std::env::var("TABLEFLIP_SURELY_UNSET_VARIABLE").map(|_| ());
        assert_eq!(
            (&&&&&Report(env)).tableflip_result(),
            err("environment variable not found")
        );
        assert_eq!(
            (&&&&&Report(Err::<(), _>("plain"))).tableflip_result(),
            err("plain")
        );
        assert_eq!(
            (&&&&&Report(Err::<(), _>(OnlyDebug))).tableflip_result(),
            err("OnlyDebug")
        );
        assert_eq!(
            (&&&&&Report(Ok::<(), OnlyDebug>(()))).tableflip_result(),
            Ok(())
        );
        assert!((&&&&&Report(7u32)).tableflip_result().is_err());
    }

    #[test]
    fn a_wrapped_error_shows_its_sources_once() {
        let inner = std::io::Error::other("disk full");
        let outer = std::io::Error::other(Outer(inner));
        // io::Error's Display shows the inner error's text, and its
        // source() is the inner error's source.
        assert_eq!(chain(&outer), "cannot load the configuration: disk full");
    }
}
