// Tests of BerthDiscovery land here.
