-- The tenants and keys that existed before the admin log began, and so have no entry in it: the
-- audit does not hold them against the log. Taken once, here; anything stored later without
-- its entry is reported.
CREATE TABLE admin_baseline (
    kind     TEXT NOT NULL,
    tenant   TEXT NOT NULL,
    key_id   TEXT
);
INSERT INTO admin_baseline (kind, tenant, key_id)
    SELECT 'tenant', name, NULL FROM tenants
    WHERE name NOT IN (SELECT tenant FROM admin_log WHERE action = 'tenant_created');
INSERT INTO admin_baseline (kind, tenant, key_id)
    SELECT 'key', tenant, substr(key_sha256, 1, 16) FROM api_keys
    WHERE substr(key_sha256, 1, 16) NOT IN
          (SELECT key_id FROM admin_log WHERE action = 'key_created' AND key_id IS NOT NULL);
CREATE TRIGGER admin_baseline_is_fixed BEFORE INSERT OR UPDATE ON admin_baseline
    FOR EACH ROW EXECUTE FUNCTION rein_refuse('the admin baseline is fixed');
