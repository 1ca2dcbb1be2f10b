"""jwst-wiimatch: least-squares background matching for JWST."""
