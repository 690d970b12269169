// Tests of BerthEtcd land here.
