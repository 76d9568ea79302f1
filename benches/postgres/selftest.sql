-- Functional check of tally_bench.debit, run by run.sh after loading
-- schema.sql and before any timing. Everything happens in a transaction that
-- is rolled back, with ids (negative) that the benchmark never uses.
\set ON_ERROR_STOP 1
begin;
insert into tally_bench.wallets (id, balance) values (-1, 5);
do $$
declare
    r text;
begin
    r := tally_bench.debit(-1, -1, 3);
    assert r = 'ok', 'first debit: ' || r;
    assert tally_bench.balance(-1) = 2, 'balance after first debit';

    r := tally_bench.debit(-1, -1, 3);
    assert r = 'duplicate', 'same request again: ' || r;
    assert tally_bench.balance(-1) = 2, 'duplicate must not touch the balance';

    r := tally_bench.debit(-2, -1, 3);
    assert r = 'insufficient', 'overdraw: ' || r;
    assert tally_bench.balance(-1) = 2, 'refused debit must not touch the balance';
    assert not exists (select 1 from tally_bench.ledger where request_id = -2),
        'refused debit must leave no ledger row';

    r := tally_bench.debit(-3, -1, 2);
    assert r = 'ok', 'debit to exactly zero: ' || r;
    assert tally_bench.balance(-1) = 0, 'balance at zero';

    r := tally_bench.debit(-2, -1, 0.000001);
    assert r = 'insufficient', 'retry of a refused id on an empty wallet: ' || r;

    r := tally_bench.debit(-4, -999, 1);
    assert r = 'insufficient', 'unknown wallet: ' || r;

    assert (select count(*) from tally_bench.ledger where request_id < 0) = 2,
        'exactly the two accepted debits are in the ledger';

    begin
        perform tally_bench.debit(-5, -1, 0);
        raise exception 'zero amount was accepted';
    exception when raise_exception then
        if sqlerrm = 'zero amount was accepted' then
            raise;
        end if;
    end;
end
$$;
rollback;
select 'selftest ok' as result;
