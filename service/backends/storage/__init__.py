"""Object stores: local (a directory tree with signed-URL grants) and swift."""
