-- Each tenant's secrets: what a spec registered over the API names with `${NAME}` and
-- `api_key_env` (it can never name the server's environment). Values are stored sealed
-- (XChaCha20-Poly1305 under the operator's key, bound to the tenant and the name), so the
-- database alone reveals none; setting or deleting one is recorded in the admin log.
CREATE TABLE tenant_secrets (
    tenant      TEXT NOT NULL REFERENCES tenants (name),
    name        TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;
