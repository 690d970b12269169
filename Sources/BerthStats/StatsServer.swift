// The stats server lands here (issue 7).
