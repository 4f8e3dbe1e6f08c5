use std::fmt;

/// The error of a workflow or a step: a message, and whether retrying
/// could help.
///
/// `?` converts the errors workflows commonly meet (`String`, `&str`,
/// `std::io::Error`, `serde_json::Error`, parse errors, ...). For any other
/// error type use [`Error::new`] or `map_err(Error::from_display)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    permanent: bool,
    cancelled: bool,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error { message: message.into(), permanent: false, cancelled: false }
    }

    /// An error that retrying cannot fix (bad input, a declined card):
    /// marked so that retry policies give up at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Error { message: message.into(), permanent: true, cancelled: false }
    }

    /// The run was cancelled (`cairn cancel RUN --grace SECONDS`): the host
    /// delivers this once, at the workflow's next step, sleep or signal
    /// wait. The workflow may still run steps (compensations, say) until
    /// the grace period ends; however it finishes, the run ends `cancelled`.
    pub(crate) fn cancelled(message: String) -> Self {
        Error { message, permanent: true, cancelled: true }
    }

    /// Convert any displayable error.
    pub fn from_display(e: impl fmt::Display) -> Self {
        Error::new(e.to_string())
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// True for the error that delivers a cancellation to the workflow.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::new(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::new(message)
    }
}

macro_rules! from_display {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::new(e.to_string())
            }
        }
    )*};
}

from_display!(
    std::io::Error,
    serde_json::Error,
    std::fmt::Error,
    std::num::ParseIntError,
    std::num::ParseFloatError,
    std::num::TryFromIntError,
    std::str::Utf8Error,
    std::string::FromUtf8Error,
    std::str::ParseBoolError,
    std::time::SystemTimeError,
);

impl From<Box<dyn std::error::Error + Send + Sync>> for Error {
    fn from(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Error::new(e.to_string())
    }
}
