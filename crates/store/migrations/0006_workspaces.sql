-- workspaces (docs/WORKSPACES.md): a repository's persistent state as a
-- stack of immutable layers (JSON array of layer ids, newest first); the
-- job writing it, if any, holds it through `writer`
CREATE TABLE workspaces (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    repo_path TEXT NOT NULL,
    stack TEXT NOT NULL,
    writer TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX workspaces_name ON workspaces (owner, name);
CREATE UNIQUE INDEX workspaces_writer ON workspaces (writer) WHERE writer IS NOT NULL;
-- a checkpoint is a workspace's stack, named and kept
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    workspace_id TEXT NOT NULL,
    name TEXT NOT NULL,
    stack TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX checkpoints_name ON checkpoints (workspace_id, name);
