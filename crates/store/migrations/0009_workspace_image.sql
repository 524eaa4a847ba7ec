-- the image a workspace's jobs and sessions run on unless they name their
-- own (a digest, resolved when the workspace was made); NULL: the profile's
ALTER TABLE workspaces ADD COLUMN image TEXT;
