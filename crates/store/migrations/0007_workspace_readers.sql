-- read-only use of a workspace beside its writer: a job or session that
-- reads the stack the workspace had when it was accepted (kept from the
-- layer sweep until the reader ends), and leaves nothing in it
CREATE TABLE workspace_readers (
    reader TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    stack TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
