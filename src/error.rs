//! The crate's error type. Native code returns `Result<T>` and chains with `?`;
//! the host turns an [`Error`] into a Rhai runtime error at the calling line.

use std::path::PathBuf;

/// Every failure of the native layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error raised by a candle op (shape mismatch, dtype, device...).
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is wrong; names the file and, where known, the tensor.
    #[error("{}{}: {msg}", path.display(), tensor.as_ref().map(|t| format!(" (tensor '{t}')")).unwrap_or_default())]
    File {
        /// The file.
        path: PathBuf,
        /// The tensor, when one is at fault.
        tensor: Option<String>,
        /// What is wrong.
        msg: String,
    },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

/// The result of the native layers.
pub type Result<T> = std::result::Result<T, Error>;

/// A candle error's message without the backtrace candle attaches when
/// RUST_BACKTRACE is set: users need the reason, not candle's call stack.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other.to_string(),
    }
}

impl Error {
    /// An error with this message.
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// Wrong content in `path` (and `tensor`, when known).
    pub fn file(path: impl Into<PathBuf>, tensor: Option<&str>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), tensor: tensor.map(str::to_string), msg: msg.to_string() }
    }
}

/// `bail!("...")` returns an [`Error::Msg`] from the current function.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
