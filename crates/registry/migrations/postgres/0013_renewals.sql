-- A renewed certificate's successor names it until the successor is first seen on a
-- connection; then the renewed one becomes INACTIVE (nothing piles up) and the link is cleared.
ALTER TABLE certificates ADD COLUMN renews TEXT;
