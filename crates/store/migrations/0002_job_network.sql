-- a job's own network policy ("none", "host", "allow:..."); NULL: its profile's
ALTER TABLE jobs ADD COLUMN network TEXT;
