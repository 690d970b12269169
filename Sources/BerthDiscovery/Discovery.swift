// Key schema, catalog and watch → routing land here (issue 5).
