//! What can go wrong while wiring Rein together, split by who can fix it.

/// An error of the wiring: the user's input, or something Rein needs that is not there.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the user gave is wrong (a spec, a script, a config file, a flag): nothing was run,
    /// and the message says what to change. The CLI exits with code 2.
    #[error("{0}")]
    BadInput(String),
    /// Something Rein needs could not be opened, reached or set up (a store, the shared
    /// counters, a file, the system's randomness).
    #[error("{what}: {source}")]
    Unavailable {
        /// What could not be done, as a person reads it.
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] rein_store::StoreError),
}

impl Error {
    /// Bad input, with its message.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Error::BadInput(message.into())
    }

    /// `what` could not be done because of `source`.
    pub fn unavailable(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Unavailable {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// A result of the wiring.
pub type Result<T, E = Error> = std::result::Result<T, E>;
