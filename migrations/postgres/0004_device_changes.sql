-- The devices' changes in commit order (only adds: the previous release keeps working beside
-- this one, and its writes are stamped too).
-- `changed_xid` is the transaction that last changed a row in something a reader acts on
-- (its `changed_at` moved). A reader keeps the oldest transaction still running when it read
-- (`pg_snapshot_xmin`) and reads from there next time: every change is read once, and again
-- only if it committed while an older transaction still ran.
ALTER TABLE devices ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '0';
CREATE INDEX devices_changed_xid ON devices (changed_xid);
CREATE FUNCTION devices_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.changed_at IS DISTINCT FROM OLD.changed_at THEN
        NEW.changed_xid := pg_current_xact_id();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER devices_stamp_change BEFORE INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_stamp_change();
