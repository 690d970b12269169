// Docker client and registration land here (issue 6).
