-- An API key may expire: past `expires_ms` it authenticates nothing, as if revoked (NULL: it
-- never expires, as every key made before this migration).
ALTER TABLE api_keys ADD COLUMN expires_ms BIGINT;
