//! Problems found in a spec, each with its file position and field path, reported all at once.

use crate::yaml::Pos;
use std::fmt;

/// One problem in a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where it is.
    pub pos: Pos,
    /// The field, e.g. `limits.max_cost_usd` or `tools[0].contract.timeout`.
    pub path: String,
    /// What is wrong, and what to write instead.
    pub message: String,
}

/// Every problem found in one spec file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors {
    /// The file, as the user named it.
    pub file: String,
    /// The problems, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let field = if d.path.is_empty() {
                "(document)"
            } else {
                &d.path
            };
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, d.pos.line, d.pos.col, field, d.message
            )?;
        }
        Ok(())
    }
}
