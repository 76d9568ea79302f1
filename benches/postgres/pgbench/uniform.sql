-- One strict debit on a wallet drawn uniformly from 1..100000.
-- The request id comes from a sequence, so it is unique across clients,
-- threads and runs; the amount is 0.001 .. 1.000.
\set wallet random(1, 100000)
\set milli random(1, 1000)
select tally_bench.debit(nextval('tally_bench.req_seq'), :wallet, :milli * 0.001);
