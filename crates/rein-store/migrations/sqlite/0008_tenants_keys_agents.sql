-- `rein serve`: tenants, their API keys (only a SHA-256 of each key is kept: keys are 256-bit
-- random strings, shown once when created), and agent specs registered over the API, versioned
-- per tenant and name (a run pins the version it started with).
CREATE TABLE tenants (
    name        TEXT PRIMARY KEY NOT NULL,
    created_ms  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE api_keys (
    key_sha256  TEXT PRIMARY KEY NOT NULL,
    tenant      TEXT NOT NULL REFERENCES tenants (name),
    created_ms  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE agents (
    tenant      TEXT NOT NULL REFERENCES tenants (name),
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, name, version)
) WITHOUT ROWID;
