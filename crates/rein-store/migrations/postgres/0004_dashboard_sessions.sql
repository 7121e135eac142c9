-- The dashboard's signed-in browsers. A browser's cookie holds a random token, never the API key
-- it signed in with; only the token's SHA-256 is kept here, with the key's. Signing out removes
-- the row, so a copied cookie stops working; revoking the key removes its sessions with it.
CREATE TABLE dashboard_sessions (
    token_sha256  TEXT PRIMARY KEY,
    key_sha256    TEXT NOT NULL REFERENCES api_keys (key_sha256) ON DELETE CASCADE,
    expires_ms    BIGINT NOT NULL
);

CREATE INDEX dashboard_sessions_by_key ON dashboard_sessions (key_sha256);
