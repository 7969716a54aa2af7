from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION delivery_audit_logs_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'delivery_audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER delivery_audit_logs_no_update_delete
    BEFORE UPDATE OR DELETE ON delivery_audit_logs
    FOR EACH ROW EXECUTE FUNCTION delivery_audit_logs_append_only();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS delivery_audit_logs_no_update_delete ON delivery_audit_logs;
DROP FUNCTION IF EXISTS delivery_audit_logs_append_only();
"""


class Migration(migrations.Migration):
    dependencies = [("audit", "0002_initial")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
