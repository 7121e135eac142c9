//! Typed identifiers, so a tenant id can never be passed where a run id goes.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a raw id. Ids are opaque: Rein never parses them.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as text, for storage and display.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// One execution of one agent version for one input.
    RunId
);
string_id!(
    /// The customer that owns runs; every store query is scoped by it.
    TenantId
);
string_id!(
    /// The end user a run is attributed to.
    UserId
);
string_id!(
    /// A conversation that groups runs.
    SessionId
);
string_id!(
    /// An optional batch job a run belongs to.
    JobId
);
