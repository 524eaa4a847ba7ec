-- a session's changes, captured when it ends (NULL: none captured, e.g.
-- after a crash or when its sandbox never started)
ALTER TABLE sessions ADD COLUMN patch BLOB;
