// Tests of BerthRegistrar land here.
