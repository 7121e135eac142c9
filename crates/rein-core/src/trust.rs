//! Who wrote a run's spec, and so what the spec may reach outside the run.
//!
//! A spec names secrets (`${NAME}` in an HTTP tool's headers, `api_key_env` in a model entry)
//! and addresses (tool URLs, model `base_url`s). Whose secrets and which addresses depends on
//! its author: the operator's machine is the local user's own, but a tenant is a guest on it.
//! The author is recorded with the run (`run_started`), so a run resumed by any process, a
//! server's worker or `rein runs resume`, reaches exactly what it reached when it started.

use serde::{Deserialize, Serialize};

/// A run's spec author.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    /// The operator, or a local user of the CLI (the operator of their own machine): `${NAME}`
    /// and `api_key_env` read the process's environment, and any address may be reached.
    #[default]
    Operator,
    /// A tenant, through a spec registered over the API: `${NAME}` and `api_key_env` name the
    /// secrets the operator stored for that tenant (`rein secrets set`), never the
    /// environment; tools and models reach only what the egress policy allows.
    Tenant,
}

impl Trust {
    /// The name shown: `operator` or `tenant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Operator => "operator",
            Trust::Tenant => "tenant",
        }
    }
}

/// The secret names a `${NAME}` template refers to, in order, each once.
pub fn secret_references(template: &str) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            break;
        };
        let name = &after[..end];
        if !names.contains(&name) {
            names.push(name);
        }
        rest = &after[end + 1..];
    }
    names
}

/// Replaces each `${NAME}` in `template` with `lookup(NAME)`; on a name `lookup` does not
/// know, returns that name. An unclosed `${` is kept as text.
pub fn expand_secrets(
    template: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(&lookup(name).ok_or_else(|| name.to_string())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_their_secrets_and_expand_from_the_lookup_given() {
        let t = "Bearer ${TOKEN}; ${TEAM}-${TOKEN} ${open";
        assert_eq!(secret_references(t), ["TOKEN", "TEAM"]);
        let lookup = |n: &str| (n != "MISSING").then(|| n.to_lowercase());
        assert_eq!(
            expand_secrets(t, lookup).unwrap(),
            "Bearer token; team-token ${open"
        );
        assert_eq!(
            expand_secrets("x ${MISSING} y", lookup).unwrap_err(),
            "MISSING"
        );
    }

    #[test]
    fn the_author_is_written_by_name() {
        assert_eq!(
            serde_json::to_string(&Trust::Tenant).unwrap(),
            r#""tenant""#
        );
        assert_eq!(
            serde_json::from_str::<Trust>(r#""operator""#).unwrap(),
            Trust::Operator
        );
    }
}
